//! Point-in-time recovery. `target` says what to recover to (the `--target-*` options and their
//! `recovery_target_*` settings); `plan` chooses the base backup and the exact WAL that reach
//! it, as a pure function of the repository's listing; `window` computes what the archive can
//! recover at all (for `pgpitr list`); `settings` renders what a restore writes for PostgreSQL.
//! Nothing in those modules does I/O. The I/O lives beside them: `source` reads the planner's
//! input from a repository, `restore` executes a [`RecoveryPlan`] into a new data directory,
//! `start` starts PostgreSQL on it and waits for the end of recovery.

pub mod plan;
pub mod restore;
pub mod settings;
pub mod source;
pub mod start;
pub mod target;
/// What the archive can recover at all; part of the planner, named here for its users.
pub use plan::window;

pub use plan::{plan, BackupSummary, PlanError, PlanInput, RecoveryPlan, RestorePoint};
pub use target::{RecoveryTarget, RecoveryTargetSpec, TargetTimeline};
pub use window::{archived_wal_ranges, recoverable_windows, RecoverableWindow, TimelineWal};

/// Serde helpers: WAL names are written in their PostgreSQL text form.
pub(crate) mod display_serde {
    use std::fmt::Display;

    use serde::Serializer;

    pub fn one<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn option<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn seq<T: Display, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| x.to_string()))
    }
}
