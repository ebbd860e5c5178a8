//! Message framing over the (plain, TLS or Unix-socket) byte stream, and decoding helpers for
//! the backend messages this client reads.
//!
//! Framing and message bodies use `postgres_protocol::message::{frontend, backend}` (protocol
//! docs, "Message Formats"). CopyData payloads are handed out as `Bytes` slices of the read
//! buffer, without copying.

use std::io;

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{DataRowBody, ErrorFields, Message, RowDescriptionBody};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{ServerMessage, WalsenderError};

/// Largest backend message accepted, in bytes. Walsender messages are small except CopyData
/// (at most a few hundred kB) and the TIMELINE_HISTORY row; this bounds memory on a broken or
/// hostile stream.
pub(crate) const MAX_MESSAGE_LEN: usize = 256 * 1024 * 1024;

/// Minimum free space kept in the read buffer before each read, in bytes (a base backup
/// streams gigabytes: large reads mean few system calls).
const READ_CHUNK: usize = 256 * 1024;
/// Size of each read buffer, in bytes: a few reads' worth, and under the allocator's mmap
/// threshold (`crate::heap`).
const BUFFER_SIZE: usize = 4 * READ_CHUNK - 4096;
/// Read buffers kept for reuse at most. The payloads handed out keep their buffer alive while
/// they wait downstream (a base backup queues about 5 MiB between the network and the tar
/// reader); enough buffers to cover that means no new memory after the first megabytes.
const MAX_SPARE: usize = 12;

/// A byte stream the client can talk over.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A framed protocol connection: buffered reads of whole backend messages, buffered writes.
pub(crate) struct Wire {
    io: Box<dyn Stream>,
    rbuf: BytesMut,
    /// Earlier read buffers, reusable once every payload split off them has been dropped.
    spare: Vec<BytesMut>,
    /// Frontend messages are encoded here, then sent by [`Wire::flush`].
    pub wbuf: BytesMut,
}

impl Wire {
    pub fn new(io: Box<dyn Stream>) -> Self {
        Self {
            io,
            rbuf: BytesMut::with_capacity(BUFFER_SIZE),
            spare: Vec::new(),
            wbuf: BytesMut::with_capacity(1024),
        }
    }

    /// Writes out everything encoded into `wbuf`.
    pub async fn flush(&mut self) -> Result<(), WalsenderError> {
        self.io
            .write_all(&self.wbuf)
            .await
            .map_err(WalsenderError::Io)?;
        self.wbuf.clear();
        self.io.flush().await.map_err(WalsenderError::Io)
    }

    /// Reads the next complete backend message.
    ///
    /// # Errors
    ///
    /// [`WalsenderError::Io`] if the stream fails or ends, [`WalsenderError::Protocol`] for a
    /// malformed, unknown or oversized message.
    pub async fn read_message(&mut self) -> Result<Message, WalsenderError> {
        loop {
            // Parsed only once whole: `Message::parse` reserves room for the length a header
            // claims, which a broken or hostile stream could set to `MAX_MESSAGE_LEN` for every
            // message. The buffer grows by what arrives instead ([`Wire::make_room`]).
            if self.rbuf.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                        as usize;
                if len > MAX_MESSAGE_LEN {
                    return Err(WalsenderError::Protocol(format!(
                        "server message of type '{}' is too large ({len} bytes)",
                        char::from(self.rbuf[0]).escape_default()
                    )));
                }
                if self.rbuf.len() > len {
                    match Message::parse(&mut self.rbuf) {
                        Ok(Some(msg)) => return Ok(msg),
                        Ok(None) => {}
                        Err(e) => {
                            return Err(WalsenderError::Protocol(format!(
                                "invalid message from server: {e}"
                            )))
                        }
                    }
                }
            }
            self.make_room();
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(WalsenderError::Io)?;
            if n == 0 {
                return Err(WalsenderError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection unexpectedly",
                )));
            }
        }
    }

    /// Ensures [`READ_CHUNK`] bytes of free space after the unparsed bytes, reusing memory.
    ///
    /// `BytesMut::reserve` would allocate a new buffer whenever payloads of the current one are
    /// still held downstream, which during a base backup is nearly always: gigabytes of fresh
    /// allocations, each page faulted in anew once the allocator has given the last one back.
    /// Instead the read continues in a spare buffer whose payloads have all been dropped.
    fn make_room(&mut self) {
        if self.rbuf.capacity() - self.rbuf.len() >= READ_CHUNK || self.rbuf.try_reclaim(READ_CHUNK)
        {
            return;
        }
        if self.rbuf.len() > BUFFER_SIZE / 4 {
            // A message larger than the buffers: grown in place, not copied into each.
            self.rbuf.reserve(READ_CHUNK);
            return;
        }
        let mut next = match self
            .spare
            .iter_mut()
            .position(|b| b.try_reclaim(BUFFER_SIZE))
        {
            Some(i) => self.spare.swap_remove(i),
            None => BytesMut::with_capacity(BUFFER_SIZE),
        };
        next.extend_from_slice(&self.rbuf);
        let mut previous = std::mem::replace(&mut self.rbuf, next);
        previous.clear();
        if self.spare.len() < MAX_SPARE {
            self.spare.push(previous);
        }
    }

    /// Sends Terminate and shuts the stream down; errors are ignored (the peer may be gone).
    pub async fn terminate(&mut self) {
        postgres_protocol::message::frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }
}

/// Decodes the fields of an ErrorResponse or NoticeResponse.
pub(crate) fn server_message(mut fields: ErrorFields<'_>) -> Result<ServerMessage, WalsenderError> {
    let mut msg = ServerMessage::default();
    let mut localized_severity = String::new();
    while let Some(field) = fields.next().map_err(bad_message)? {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'S' => localized_severity = value,
            b'V' => msg.severity = value,
            b'C' => msg.sqlstate = value,
            b'M' => msg.message = value,
            b'D' => msg.detail = Some(value),
            b'H' => msg.hint = Some(value),
            _ => {}
        }
    }
    if msg.severity.is_empty() {
        msg.severity = localized_severity;
    }
    Ok(msg)
}

/// Decodes a DataRow into one optional value per column.
pub(crate) fn data_row(body: &DataRowBody) -> Result<Vec<Option<Bytes>>, WalsenderError> {
    let buf = body.buffer_bytes();
    body.ranges()
        .map(|r| Ok(r.map(|r| buf.slice(r))))
        .collect()
        .map_err(bad_message)
}

/// Column names of a RowDescription.
pub(crate) fn column_names(body: &RowDescriptionBody) -> Result<Vec<String>, WalsenderError> {
    body.fields()
        .map(|f| Ok(f.name().to_owned()))
        .collect()
        .map_err(bad_message)
}

fn bad_message(e: io::Error) -> WalsenderError {
    WalsenderError::Protocol(format!("malformed message from server: {e}"))
}

/// Logs a NoticeResponse (e.g. "all required WAL segments have been archived").
pub(crate) fn log_notice(msg: &ServerMessage) {
    match msg.severity.as_str() {
        "WARNING" => tracing::warn!(sqlstate = %msg.sqlstate, "server: {}", msg.message),
        _ => tracing::info!(sqlstate = %msg.sqlstate, "server: {}", msg.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CopyData message of `len` bytes, each its index's low byte plus `seed`.
    fn copy_data(len: usize, seed: u8) -> Vec<u8> {
        let mut m = vec![b'd'];
        m.extend_from_slice(&(len as u32 + 4).to_be_bytes());
        m.extend((0..len).map(|i| (i as u8).wrapping_add(seed)));
        m
    }

    fn check(msg: Message, len: usize, seed: u8) -> Bytes {
        let Message::CopyData(body) = msg else {
            panic!("not CopyData")
        };
        let p = body.into_bytes();
        assert_eq!(p.len(), len);
        assert!(p
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i as u8).wrapping_add(seed)));
        p
    }

    #[tokio::test]
    async fn messages_are_whole_across_buffer_switches() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let sizes: Vec<usize> = (0..120).map(|i| 30_000 + i * 997).collect();
        let big = 3 * BUFFER_SIZE + 5;
        let to_send = sizes.clone();
        tokio::spawn(async move {
            for (i, len) in to_send.into_iter().enumerate() {
                server.write_all(&copy_data(len, i as u8)).await.unwrap();
                if i == 60 {
                    server.write_all(&copy_data(big, 7)).await.unwrap();
                }
            }
        });
        let mut wire = Wire::new(Box::new(client));
        // Payloads held downstream for a while, then dropped: reads switch buffers and reuse
        // them, and every message still arrives whole.
        let mut held = Vec::new();
        for (i, len) in sizes.iter().enumerate() {
            held.push(check(wire.read_message().await.unwrap(), *len, i as u8));
            if i == 60 {
                check(wire.read_message().await.unwrap(), big, 7);
            }
            if held.len() == 25 {
                held.clear();
            }
        }
        assert!(wire.spare.len() <= MAX_SPARE);
    }

    #[test]
    fn a_buffer_whose_payloads_are_dropped_takes_the_next_reads() {
        let (client, _server) = tokio::io::duplex(64);
        let mut wire = Wire::new(Box::new(client));
        let fill = |wire: &mut Wire| {
            let free = wire.rbuf.capacity() - wire.rbuf.len();
            wire.rbuf.extend_from_slice(&vec![1; free - 100]);
            wire.rbuf.split().freeze()
        };
        let first = fill(&mut wire);
        let first_buffer = first.as_ptr();
        // Its payload still held: the reads continue in another buffer.
        wire.make_room();
        assert_eq!(wire.spare.len(), 1);
        assert_ne!(wire.rbuf.as_ptr(), first_buffer);
        drop(first);
        // Held again, while the first buffer is free: that one is taken back (the spare list
        // keeps it allocated, so the same address means the same buffer).
        let second = fill(&mut wire);
        wire.make_room();
        assert_eq!(wire.rbuf.as_ptr(), first_buffer);
        assert_eq!(wire.spare.len(), 1);
        drop(second);
        // Nothing held: room is made in place.
        let third = fill(&mut wire);
        drop(third);
        wire.make_room();
        assert_eq!(wire.rbuf.as_ptr(), first_buffer);
    }
}

/// A hostile server: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    /// Tags of the backend messages, and a few that are none.
    const TAGS: &[u8] = b"RSKZTDCIEGHWdcnNAstv123\0x";

    /// A backend message with a tag of [`TAGS`] and `body`; its length word says `body`'s
    /// length, or a `claimed` one.
    fn frame() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::sample::select(TAGS.to_vec()),
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::option::weighted(0.1, any::<u32>()),
        )
            .prop_map(|(tag, body, claimed)| {
                let len = claimed.unwrap_or(body.len() as u32 + 4);
                let mut m = vec![tag];
                m.extend_from_slice(&len.to_be_bytes());
                m.extend_from_slice(&body);
                m
            })
    }

    /// An ErrorResponse / DataRow / RowDescription body made of plausible pieces.
    fn structured() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::sample::select(b"EDTN".to_vec()),
            proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..4),
                    "[SVCMDH][a-zA-Z0-9 ]{0,20}\0".prop_map(String::into_bytes),
                    any::<i16>().prop_map(|n| n.to_be_bytes().to_vec()),
                    any::<i32>().prop_map(|n| n.to_be_bytes().to_vec()),
                    Just(vec![0]),
                ],
                0..12,
            ),
        )
            .prop_map(|(tag, pieces)| {
                let body = pieces.concat();
                let mut m = vec![tag];
                m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
                m.extend_from_slice(&body);
                m
            })
    }

    /// Reads every message of `bytes` and decodes those this client decodes, until the first
    /// error (there is always one: the end of the stream). Returns the read buffer's capacity.
    fn read_all(bytes: Vec<u8>) -> usize {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let mut wire = Wire::new(Box::new(Cursor::new(bytes)));
            loop {
                let decoded = match wire.read_message().await {
                    Ok(Message::ErrorResponse(body)) => server_message(body.fields()).map(drop),
                    Ok(Message::NoticeResponse(body)) => server_message(body.fields()).map(drop),
                    Ok(Message::DataRow(body)) => data_row(&body).map(drop),
                    Ok(Message::RowDescription(body)) => column_names(&body).map(drop),
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                };
                match decoded {
                    Ok(()) => {}
                    Err(WalsenderError::Io(_) | WalsenderError::Protocol(_)) => {
                        return wire.rbuf.capacity()
                    }
                    Err(e) => panic!("not a stream error: {e}"),
                }
            }
        })
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(3000))]

        #[test]
        fn arbitrary_bytes_end_in_a_protocol_or_io_error(
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            read_all(bytes);
        }

        #[test]
        fn streams_of_messages_with_arbitrary_bodies_and_lengths_never_panic(
            frames in proptest::collection::vec(prop_oneof![frame(), structured()], 0..20),
        ) {
            read_all(frames.concat());
        }

        #[test]
        fn a_claimed_length_is_not_allocated_before_it_arrives(
            tag in prop::sample::select(TAGS.to_vec()),
            claimed in (MAX_MESSAGE_LEN as u32 / 2)..=MAX_MESSAGE_LEN as u32,
            body in proptest::collection::vec(any::<u8>(), 0..1000),
        ) {
            let mut m = vec![tag];
            m.extend_from_slice(&claimed.to_be_bytes());
            m.extend_from_slice(&body);
            prop_assert!(read_all(m) <= 2 * BUFFER_SIZE);
        }
    }
}
