//! SHA-256 and lz4 of backup chunks on worker threads.
//!
//! The tar reader cuts files into chunks on one thread, but hashing and compressing a chunk
//! costs several times more than reading it. [`ChunkWorkers`] runs that work on `n` threads:
//! the reader submits a chunk buffer tagged with its place in the backup ([`Tag`]) and gets
//! [`Hashed`] results back in completion order, each returning its buffer. A chunk that the
//! repository already holds (the [`ChunkSet`] loaded when the backup started) is hashed but
//! not compressed. The reader owns a fixed number of buffers, which bounds the memory in
//! flight; the workers keep a small pool of frame buffers for the same reason.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use super::pack::ChunkSet;
use crate::repo::codec;

/// Where a chunk belongs: the index of its file in the backup's file list and its position
/// in that file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub file: usize,
    pub chunk: usize,
}

/// A chunk after the workers: its hash and, unless the repository already held it, its lz4
/// frame.
#[derive(Debug)]
pub struct Hashed {
    pub tag: Tag,
    pub sha256: [u8; 32],
    /// The buffer handed back, the caller's to reuse; the chunk is its first `len` bytes.
    pub plain: Vec<u8>,
    pub len: usize,
    /// `None` when the chunk is in the repository's [`ChunkSet`]. Return it with
    /// [`ChunkWorkers::recycle_frame`] once copied.
    pub frame: Option<Vec<u8>>,
}

struct Job {
    tag: Tag,
    plain: Vec<u8>,
    len: usize,
}

/// A pool of threads hashing and compressing chunks. Dropping it stops the threads once the
/// submitted chunks are done.
pub struct ChunkWorkers {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Hashed>,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    threads: Vec<JoinHandle<()>>,
    in_flight: usize,
}

/// Frame buffers kept for reuse, per worker.
const FRAMES_PER_WORKER: usize = 2;

impl ChunkWorkers {
    /// Starts `n` (at least 1) worker threads; `existing` is the set of chunks not to
    /// compress again.
    pub fn start(n: usize, existing: Arc<ChunkSet>) -> ChunkWorkers {
        let n = n.max(1);
        let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(n * 4);
        let (done_tx, done_rx) = mpsc::channel();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..n)
            .map(|i| {
                let jobs = jobs_rx.clone();
                let done = done_tx.clone();
                let frames = frames.clone();
                let existing = existing.clone();
                std::thread::Builder::new()
                    .name(format!("pgpitr-chunk-{i}"))
                    .spawn(move || work(&jobs, &done, &frames, &existing))
                    .expect("spawning a chunk worker")
            })
            .collect();
        ChunkWorkers {
            jobs: Some(jobs_tx),
            done: done_rx,
            frames,
            threads,
            in_flight: 0,
        }
    }

    /// Hands the first `len` bytes of `plain` to the workers. (The buffer keeps its length,
    /// so that reusing it never zero-fills it again.)
    pub fn submit(&mut self, tag: Tag, plain: Vec<u8>, len: usize) {
        assert!(len <= plain.len());
        let jobs = self.jobs.as_ref().expect("workers running");
        jobs.send(Job { tag, plain, len })
            .expect("chunk workers run until dropped");
        self.in_flight += 1;
    }

    /// Chunks submitted and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The next finished chunk, waiting for one; `None` when nothing is in flight.
    pub fn wait_next(&mut self) -> Option<Hashed> {
        if self.in_flight == 0 {
            return None;
        }
        let h = self.done.recv().expect("chunk workers run until dropped");
        self.in_flight -= 1;
        Some(h)
    }

    /// A finished chunk if one is ready, without waiting.
    pub fn try_next(&mut self) -> Option<Hashed> {
        let h = self.done.try_recv().ok()?;
        self.in_flight -= 1;
        Some(h)
    }

    /// Gives a frame buffer back to the workers.
    pub fn recycle_frame(&self, frame: Vec<u8>) {
        let mut frames = self.frames.lock().expect("frame pool");
        if frames.len() < self.threads.len() * FRAMES_PER_WORKER {
            frames.push(frame);
        }
    }
}

impl Drop for ChunkWorkers {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn work(
    jobs: &Mutex<Receiver<Job>>,
    done: &mpsc::Sender<Hashed>,
    frames: &Mutex<Vec<Vec<u8>>>,
    existing: &ChunkSet,
) {
    let mut scratch = Vec::new();
    loop {
        let job = jobs.lock().expect("job queue").recv();
        let Ok(Job { tag, plain, len }) = job else {
            return;
        };
        let chunk = &plain[..len];
        let sha256: [u8; 32] = Sha256::digest(chunk).into();
        let frame = (!existing.contains(&sha256)).then(|| {
            let mut frame = frames.lock().expect("frame pool").pop().unwrap_or_default();
            frame.clear();
            codec::append_frame(chunk, &mut scratch, &mut frame);
            frame
        });
        let hashed = Hashed {
            tag,
            sha256,
            plain,
            len,
            frame,
        };
        if done.send(hashed).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_comes_back_hashed_and_compressed() {
        let mut w = ChunkWorkers::start(3, Arc::new(ChunkSet::default()));
        let chunks: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 1000 + i as usize]).collect();
        for (i, c) in chunks.iter().enumerate() {
            let mut buf = c.clone();
            buf.extend_from_slice(b"not part of the chunk");
            w.submit(Tag { file: i, chunk: 0 }, buf, c.len());
        }
        assert_eq!(w.in_flight(), 20);
        let mut seen = vec![false; chunks.len()];
        while let Some(h) = w.wait_next() {
            let i = h.tag.file;
            assert_eq!(&h.plain[..h.len], &chunks[i][..]);
            assert_eq!(h.sha256, <[u8; 32]>::from(Sha256::digest(&chunks[i])));
            let mut back = Vec::new();
            codec::decompress_verified(
                h.frame.as_ref().unwrap(),
                codec::Expected::sha256(&hex::encode(h.sha256)),
                &mut back,
            )
            .unwrap();
            assert_eq!(back, chunks[i]);
            w.recycle_frame(h.frame.unwrap());
            seen[i] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert!(w.try_next().is_none());
    }
}
