//! `kill -9` at random moments, reproducibly: a seeded generator (the seed printed, and taken
//! from `CHAOS_SEED` to replay a run), the number of kills per writer
//! (`CHAOS_KILLS`, a small sample by default; `scripts/chaos` asks for hundreds), and a
//! runner that sends SIGKILL to a command after a chosen delay unless it ended first.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A small deterministic generator (splitmix64): the same seed gives the same kill moments.
pub struct Rng {
    state: u64,
    seed: u64,
}

impl Rng {
    /// Seeded from `CHAOS_SEED`, else from the clock; the seed is printed so that a
    /// failing run can be replayed.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("chaos: {test}: seed {seed} (replay with CHAOS_SEED={seed})");
        Rng { state: seed, seed }
    }

    /// `(replay with CHAOS_SEED=…)`, for assertion messages.
    pub fn replay(&self) -> String {
        format!("(replay with CHAOS_SEED={})", self.seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A delay uniform in `0..=max`.
    pub fn delay(&mut self, max: Duration) -> Duration {
        Duration::from_micros(self.below(max.as_micros() as u64 + 1))
    }
}

/// Kills per writer: `CHAOS_KILLS`, else `default`.
pub fn kills(default: usize) -> usize {
    std::env::var("CHAOS_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// How a run under [`run_killing`] ended.
#[derive(Debug)]
pub enum Ending {
    /// SIGKILL arrived while it ran.
    Killed,
    /// It ended by itself before the kill was due, after `took`.
    Finished(Output, Duration),
}

/// Starts `cmd` and sends it SIGKILL after `after`, unless it ended first. Only the process
/// itself is killed, as the OOM killer or `kill -9` would: children it started in the
/// background (the restore command's refill) live on.
pub fn run_killing(cmd: &mut Command, after: Duration) -> Ending {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let began = Instant::now();
    let due = began + after;
    loop {
        if child.try_wait().unwrap().is_some() {
            return Ending::Finished(child.wait_with_output().unwrap(), began.elapsed());
        }
        let now = Instant::now();
        if now >= due {
            break;
        }
        std::thread::sleep((due - now).min(Duration::from_millis(2)));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    Ending::Killed
}

/// Counts of kills that landed while a writer ran and runs that ended before their kill.
#[derive(Debug, Default)]
pub struct Tally {
    pub killed: usize,
    pub finished_first: usize,
}

impl Tally {
    pub fn note(&mut self, ending: &Ending) {
        match ending {
            Ending::Killed => self.killed += 1,
            Ending::Finished(..) => self.finished_first += 1,
        }
    }

    /// One line for the logs and `scripts/chaos`:
    /// `chaos: <writer>: <n> killed mid-run, <m> ended before their kill`.
    pub fn report(&self, writer: &str) {
        println!(
            "chaos: {writer}: {} killed mid-run, {} ended before their kill",
            self.killed, self.finished_first
        );
    }
}

/// Runs `cmd` to its end; its output and how long it took.
pub fn run_timed(cmd: &mut Command) -> (Output, Duration) {
    let began = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    (out, began.elapsed())
}

/// A writer's typical run time, learned from its runs that nobody killed: kill moments are
/// drawn uniformly over it, so that they land anywhere in a run, from its start to its end
/// (later runs of a writer are often faster than the first: deduplication, markers, caches).
pub struct Scale {
    typical: Duration,
}

impl Scale {
    /// Starts from a run of `cmd` that nobody kills (it must succeed).
    pub fn measure(cmd: &mut Command) -> Scale {
        let (out, took) = run_timed(cmd);
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Scale { typical: took }
    }

    /// Takes the time of another whole run into account.
    pub fn learn(&mut self, took: Duration) {
        self.typical = (self.typical * 2 + took) / 3;
    }

    /// A kill moment: uniform from the start to 1.1 × the typical run time.
    pub fn pick(&self, rng: &mut Rng) -> Duration {
        rng.delay(self.typical.mul_f64(1.1))
    }
}
