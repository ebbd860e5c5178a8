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

/// A byte stream the client can talk over.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A framed protocol connection: buffered reads of whole backend messages, buffered writes.
pub(crate) struct Wire {
    io: Box<dyn Stream>,
    rbuf: BytesMut,
    /// Frontend messages are encoded here, then sent by [`Wire::flush`].
    pub wbuf: BytesMut,
}

impl Wire {
    pub fn new(io: Box<dyn Stream>) -> Self {
        Self {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
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
            }
            match Message::parse(&mut self.rbuf) {
                Ok(Some(msg)) => return Ok(msg),
                Ok(None) => {}
                Err(e) => {
                    return Err(WalsenderError::Protocol(format!(
                        "invalid message from server: {e}"
                    )))
                }
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK {
                self.rbuf.reserve(READ_CHUNK);
            }
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
