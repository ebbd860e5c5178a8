//! `pgpitr plan`: which base backup and which archived WAL reach a recovery target, without
//! writing anything — the same plan `pgpitr restore` executes. Prints the chosen backup and why,
//! the WAL segments per timeline as compact ranges, the bytes to fetch and the settings a
//! restore would write; `--json` prints the [`RecoveryPlan`] itself.
//!
//! The target options ([`TargetArgs`]) are shared with `pgpitr restore`.

use clap::ArgGroup;
use jiff::Timestamp;

use crate::config::{Config, ConfigError};
use crate::pg::{Lsn, TimelineId, WalFileName, WalSegSize, WalSegmentName};
use crate::recovery::source::RepoState;
use crate::recovery::target::quote_setting;
use crate::recovery::{
    plan, PlanError, RecoveryPlan, RecoveryTarget, RecoveryTargetSpec, TargetTimeline,
};
use crate::repo::manifest::BackupId;
use crate::repo::RepoError;
use crate::storage::Storage;

use super::backup::human_bytes;

/// `--target immediate|latest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKeyword {
    /// Stop as soon as the backup is consistent (its end).
    Immediate,
    /// Replay all archived WAL (the default without any target option).
    Latest,
}

/// The recovery target options of `plan` and `restore`. At most one target; without one,
/// recovery replays everything archived (latest).
#[derive(clap::Args, Debug, Clone, Default)]
#[command(group(
    ArgGroup::new("target_kind")
        .args(["target_time", "target_lsn", "target_xid", "target_name", "target"])
        .multiple(false)
))]
#[command(group(
    ArgGroup::new("inclusive_kind")
        .args(["target_time", "target_lsn", "target_xid"])
        .multiple(false)
))]
pub struct TargetArgs {
    /// Recover to this time: '2026-11-23 10:14:59+01', '2026-11-23T09:14:59Z', PostgreSQL's
    /// timestamptz output ('2026-11-23 09:14:59.123456+00'); without an offset, local time.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub target_time: Option<Timestamp>,
    /// Recover to this WAL location (X/X, as pg_lsn).
    #[arg(long, value_name = "LSN", value_parser = parse_lsn)]
    pub target_lsn: Option<Lsn>,
    /// Recover to the commit of this transaction id.
    #[arg(long, value_name = "XID", value_parser = parse_xid)]
    pub target_xid: Option<u64>,
    /// Recover to this restore point (pg_create_restore_point()); `pgpitr list` shows those in
    /// the archived WAL.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub target_name: Option<String>,
    /// immediate: stop at the backup's end; latest: replay everything (the default).
    #[arg(long, value_enum, value_name = "immediate|latest")]
    pub target: Option<TargetKeyword>,
    /// Timeline to follow: latest (the newest that holds a backup), current (the backup's) or a
    /// number.
    #[arg(long, value_name = "latest|current|N", default_value = "latest")]
    pub target_timeline: TargetTimeline,
    /// Stop just before the target record instead of just after it (time, LSN and xid targets).
    #[arg(long, requires = "inclusive_kind")]
    pub target_exclusive: bool,
    /// Use this backup (its id, see `pgpitr list`) instead of choosing one.
    #[arg(long, value_name = "ID", value_parser = parse_backup_id)]
    pub backup: Option<BackupId>,
}

fn parse_time(s: &str) -> Result<Timestamp, String> {
    match RecoveryTarget::time(s) {
        Ok(RecoveryTarget::Time(t)) => Ok(t),
        Ok(_) => unreachable!("a time target"),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_lsn(s: &str) -> Result<Lsn, String> {
    s.trim()
        .parse()
        .map_err(|e: crate::pg::ParseError| e.to_string())
}

fn parse_xid(s: &str) -> Result<u64, String> {
    match RecoveryTarget::xid(s) {
        Ok(RecoveryTarget::Xid(x)) => Ok(x),
        Ok(_) => unreachable!("an xid target"),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_name(s: &str) -> Result<String, String> {
    RecoveryTarget::name(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

fn parse_backup_id(s: &str) -> Result<BackupId, String> {
    BackupId::parse(s).map_err(|e| e.to_string())
}

impl TargetArgs {
    /// The request these options make.
    pub fn spec(&self) -> RecoveryTargetSpec {
        let target = if let Some(t) = self.target_time {
            RecoveryTarget::Time(t)
        } else if let Some(l) = self.target_lsn {
            RecoveryTarget::Lsn(l)
        } else if let Some(x) = self.target_xid {
            RecoveryTarget::Xid(x)
        } else if let Some(n) = &self.target_name {
            RecoveryTarget::Name(n.clone())
        } else {
            match self.target {
                Some(TargetKeyword::Immediate) => RecoveryTarget::Immediate,
                Some(TargetKeyword::Latest) | None => RecoveryTarget::Latest,
            }
        };
        RecoveryTargetSpec::new(target, !self.target_exclusive, self.target_timeline)
    }
}

/// Arguments of `pgpitr plan`.
#[derive(clap::Args, Debug, Clone)]
pub struct PlanArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Read location NAME first: `main` (the repository) or a copy's name; the next locations
    /// are tried only when it is unreachable.
    #[arg(long, value_name = "NAME")]
    pub from: Option<String>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanCommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("no plan: {0}")]
    Plan(#[from] PlanError),
}

/// Reads the repository and plans for `target`.
///
/// # Errors
/// Storage errors, an unreadable repository, and every [`PlanError`].
pub async fn load_and_plan(
    storage: &dyn Storage,
    target: &TargetArgs,
) -> Result<(RepoState, RecoveryPlan), PlanCommandError> {
    let state = RepoState::load(storage).await?;
    let input = state.plan_input(target.spec(), target.backup.clone());
    let plan = plan(&input)?;
    Ok((state, plan))
}

/// `pgpitr plan`.
///
/// # Errors
/// As [`load_and_plan`].
pub async fn run(config: &Config, args: &PlanArgs) -> Result<RecoveryPlan, PlanCommandError> {
    let storage = config.storage().await?;
    Ok(load_and_plan(storage.as_ref(), &args.target).await?.1)
}

/// A run of consecutive segments of one timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRange {
    pub timeline: TimelineId,
    pub first: WalSegmentName,
    pub last: WalSegmentName,
    pub count: u64,
}

/// `segments` (in replay order) as runs of consecutive segments per timeline.
pub fn segment_ranges(segments: &[WalFileName], seg_size: WalSegSize) -> Vec<SegmentRange> {
    let mut out: Vec<SegmentRange> = Vec::new();
    for s in segments.iter().filter_map(|n| match n {
        WalFileName::Segment(s) => Some(*s),
        _ => None,
    }) {
        match out.last_mut() {
            Some(r)
                if r.timeline == s.timeline && r.last.segno(seg_size) + 1 == s.segno(seg_size) =>
            {
                r.last = s;
                r.count += 1;
            }
            _ => out.push(SegmentRange {
                timeline: s.timeline,
                first: s,
                last: s,
                count: 1,
            }),
        }
    }
    out
}

/// The plan for people.
pub fn render(plan: &RecoveryPlan) -> String {
    let b = &plan.backup;
    let seg_size = b.wal_segment_size;
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<10}  {v}\n"));
    line(
        "target",
        format!(
            "{}{}, timeline {}{}",
            plan.spec.target,
            if plan.spec.target.takes_inclusive() && !plan.spec.inclusive {
                " (exclusive)"
            } else {
                ""
            },
            plan.target_timeline,
            match plan.spec.timeline {
                TargetTimeline::Id(_) => String::new(),
                t => format!(" (--target-timeline {t})"),
            }
        ),
    );
    line(
        "backup",
        format!(
            "{} '{}': {} .. {}, lsn {} .. {} on timeline {}, {}",
            b.id,
            b.label,
            b.start_time,
            b.stop_time,
            b.start_lsn,
            b.stop_lsn,
            b.stop_timeline,
            human_bytes(b.size_bytes)
        ),
    );
    line("why", plan.reason.clone());
    if plan.timeline_path.len() > 1 {
        let path: Vec<String> = plan
            .timeline_path
            .iter()
            .map(|s| match s.end {
                Some(end) => format!("{} (until {end})", s.timeline),
                None => s.timeline.to_string(),
            })
            .collect();
        line("timelines", path.join(" -> "));
    }
    let ranges = segment_ranges(&plan.segments, seg_size);
    for (i, r) in ranges.iter().enumerate() {
        let what = if r.count == 1 {
            format!("{} (1 segment)", r.first)
        } else {
            format!("{} .. {} ({} segments)", r.first, r.last, r.count)
        };
        line(
            if i == 0 { "wal" } else { "" },
            format!("timeline {}: {what}", r.timeline),
        );
    }
    if !plan.history_files.is_empty() {
        let h: Vec<String> = plan.history_files.iter().map(|h| h.to_string()).collect();
        line("history", h.join(", "));
    }
    line(
        "wal end",
        match plan.end.first_missing {
            Some(m) => format!(
                "{} (next segment {m} is not archived; replay stops there)",
                plan.end.end_lsn
            ),
            None => format!("{} (end of {})", plan.end.end_lsn, plan.end.last_segment),
        },
    );
    line(
        "fetch",
        format!(
            "{} of backup files; {} compressed WAL in {} files (fetched during recovery by restore_command)",
            human_bytes(b.size_bytes),
            human_bytes(plan.bytes_to_fetch),
            plan.segments.len() + plan.history_files.len()
        ),
    );
    if let Some(e) = plan.window.continuous_from() {
        let to = match &plan.window.latest {
            Some(l) => format!(" to lsn {} (end of {})", l.end_lsn, l.last_segment),
            None => String::new(),
        };
        line(
            "window",
            format!(
                "timeline {}: from {} (end of backup {}, lsn {}){to}",
                plan.window.timeline, e.time, e.backup, e.lsn
            ),
        );
    }
    for r in plan.window.older_ranges().iter().rev() {
        line(
            "",
            if r.point {
                format!("before a gap, only {}", r.describe_from())
            } else {
                format!(
                    "before a gap, from {} to {}",
                    r.describe_from(),
                    r.describe_to()
                )
            },
        );
    }
    for (i, (k, v)) in plan.recovery_settings().iter().enumerate() {
        line(
            if i == 0 { "settings" } else { "" },
            format!("{k} = {}", quote_setting(v)),
        );
    }
    for n in &plan.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        target: TargetArgs,
    }

    fn parse(args: &[&str]) -> Result<TargetArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("plan").chain(args.iter().copied())).map(|c| c.target)
    }

    #[test]
    fn target_options_make_one_spec() {
        let t = parse(&["--target-time", "2026-11-23 10:14:59+01"]).unwrap();
        assert_eq!(
            t.spec(),
            RecoveryTargetSpec::new(
                RecoveryTarget::Time("2026-11-23T09:14:59Z".parse().unwrap()),
                true,
                TargetTimeline::Latest
            )
        );
        let t = parse(&[
            "--target-lsn",
            "0/5000028",
            "--target-exclusive",
            "--target-timeline",
            "2",
        ])
        .unwrap();
        assert_eq!(
            t.spec(),
            RecoveryTargetSpec::new(
                RecoveryTarget::Lsn(Lsn(0x0500_0028)),
                false,
                TargetTimeline::Id(TimelineId(2))
            )
        );
        assert_eq!(
            parse(&["--target", "immediate", "--target-timeline", "current"])
                .unwrap()
                .spec(),
            RecoveryTargetSpec::new(RecoveryTarget::Immediate, true, TargetTimeline::Current)
        );
        assert_eq!(parse(&[]).unwrap().spec(), RecoveryTargetSpec::default());
        assert_eq!(
            parse(&[
                "--target-name",
                "before-upgrade",
                "--backup",
                "20261123T080000Z"
            ])
            .unwrap()
            .backup,
            Some(BackupId::parse("20261123T080000Z").unwrap())
        );
        assert_eq!(
            parse(&["--target-xid", "1234"]).unwrap().spec().target,
            RecoveryTarget::Xid(1234)
        );
    }

    #[test]
    fn conflicting_or_bad_target_options_are_usage_errors() {
        for bad in [
            &[
                "--target-time",
                "2026-11-23 10:00:00Z",
                "--target-lsn",
                "0/1",
            ][..],
            &["--target-xid", "5", "--target", "latest"],
            &["--target-name", "x", "--target-exclusive"],
            &["--target-exclusive"],
            &["--target-time", "yesterday"],
            &["--target-lsn", "5000028"],
            &["--target-timeline", "0"],
            &["--backup", "../x"],
            &["--target", "soon"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
        let e = parse(&["--target-time", "yesterday"]).unwrap_err();
        assert!(e.to_string().contains("2026-11-23 10:14:59+01"), "{e}");
    }

    #[test]
    fn segments_are_shown_as_ranges_per_timeline() {
        let seg = WalSegSize::DEFAULT;
        let s = |tli: u32, n: u64| {
            WalFileName::Segment(WalSegmentName::from_segno(TimelineId(tli), n, seg))
        };
        let ranges = segment_ranges(
            &[s(1, 5), s(1, 6), s(1, 7), s(2, 7), s(2, 8), s(2, 10)],
            seg,
        );
        let shown: Vec<(u32, String, String, u64)> = ranges
            .iter()
            .map(|r| {
                (
                    r.timeline.0,
                    r.first.to_string(),
                    r.last.to_string(),
                    r.count,
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                (
                    1,
                    "000000010000000000000005".into(),
                    "000000010000000000000007".into(),
                    3
                ),
                (
                    2,
                    "000000020000000000000007".into(),
                    "000000020000000000000008".into(),
                    2
                ),
                (
                    2,
                    "00000002000000000000000A".into(),
                    "00000002000000000000000A".into(),
                    1
                ),
            ]
        );
    }
}
