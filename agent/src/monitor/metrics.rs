//! [`Facts`] as Prometheus metrics, encoded by `prometheus-client` (OpenMetrics text, which
//! Prometheus and node_exporter's textfile collector read). Every series carries the label
//! `repository` (the location without credentials); per-timeline series add `timeline`
//! (decimal). A fact that does not exist (no verify ever, no backup) has no series. A failed
//! scan exports `pgpitr_repository_up 0` alone. The names are an interface: alert rules are
//! written against them (docs/operations.md lists them).

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::facts::Facts;

/// The `timeline` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimelineLabel {
    timeline: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn seconds(t: jiff::Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

struct Builder {
    registry: Registry,
}

impl Builder {
    fn int(&mut self, name: &str, help: &str, v: i64) {
        let g: Gauge = Gauge::default();
        g.set(v);
        self.registry.register(name, help, g);
    }

    fn float(&mut self, name: &str, help: &str, v: f64) {
        let g = FloatGauge::default();
        g.set(v);
        self.registry.register(name, help, g);
    }

    fn per_timeline(&mut self, name: &str, help: &str, values: &[(u32, f64)]) {
        if values.is_empty() {
            return;
        }
        let family = Family::<TimelineLabel, FloatGauge>::default();
        for (tli, v) in values {
            family
                .get_or_create(&TimelineLabel {
                    timeline: tli.to_string(),
                })
                .set(*v);
        }
        self.registry.register(name, help, family);
    }
}

/// The exposition of one scan of the repository at `repository` (`Err`: the scan failed).
pub fn encode(repository: &str, scan: Result<&Facts, ()>) -> String {
    let labels = [(
        Cow::Borrowed("repository"),
        Cow::Owned(repository.to_string()),
    )];
    let mut b = Builder {
        registry: Registry::with_labels(labels.into_iter()),
    };
    let up_help = "1 when the last scan of the repository succeeded, else 0 (and no other series)";
    match scan {
        Err(()) => b.int("pgpitr_repository_up", up_help, 0),
        Ok(f) => {
            b.int("pgpitr_repository_up", up_help, 1);
            add_facts(&mut b, f);
        }
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &b.registry)
        .expect("writing to a String does not fail");
    out
}

fn add_facts(b: &mut Builder, f: &Facts) {
    b.int(
        "pgpitr_backups",
        "Committed backups in the repository",
        f.backups.len() as i64,
    );
    if let Some(last) = f.newest_backup() {
        b.float(
            "pgpitr_backup_last_completion_timestamp_seconds",
            "Stop time of the newest backup (Unix seconds)",
            seconds(last.stop_time),
        );
        b.int(
            "pgpitr_backup_last_size_bytes",
            "Total size of the files of the newest backup, in bytes",
            int(last.size_bytes),
        );
        b.float(
            "pgpitr_backup_last_duration_seconds",
            "How long the newest backup took, start to stop, in seconds",
            last.duration_seconds(),
        );
    }
    if let Some(prev) = f.backups.len().checked_sub(2).map(|i| &f.backups[i]) {
        b.int(
            "pgpitr_backup_previous_size_bytes",
            "Total size of the files of the backup before the newest, in bytes",
            int(prev.size_bytes),
        );
    }
    let wal: Vec<(u32, f64)> = f
        .wal
        .iter()
        .map(|w| (w.timeline.0, seconds(w.stored_at)))
        .collect();
    b.per_timeline(
        "pgpitr_wal_last_archived_timestamp_seconds",
        "Storage time of the newest archived WAL object of the timeline (Unix seconds)",
        &wal,
    );
    let starts: Vec<(u32, f64)> = f
        .windows
        .iter()
        .map(|w| (w.timeline.0, seconds(w.start)))
        .collect();
    b.per_timeline(
        "pgpitr_recovery_window_start_timestamp_seconds",
        "Earliest point recoverable on the timeline: stop time of its oldest restorable backup (Unix seconds)",
        &starts,
    );
    let ends: Vec<(u32, f64)> = f
        .windows
        .iter()
        .filter_map(|w| Some((w.timeline.0, seconds(w.end?))))
        .collect();
    b.per_timeline(
        "pgpitr_recovery_window_end_timestamp_seconds",
        "Latest point recoverable on the timeline: storage time of the last WAL segment archived without a gap (Unix seconds)",
        &ends,
    );
    b.int(
        "pgpitr_repository_size_bytes",
        "Sum of the sizes of all objects in the repository, in bytes",
        int(f.repository_bytes),
    );
    b.int(
        "pgpitr_repository_written_last_7d_bytes",
        "Sum of the sizes of the objects stored within the last 7 days, in bytes",
        int(f.written_last_7d_bytes),
    );
    if let Some(v) = &f.verify {
        b.float(
            "pgpitr_verify_last_run_timestamp_seconds",
            "When the last `pgpitr verify` ended (Unix seconds)",
            seconds(v.last.finished_at),
        );
        b.int(
            "pgpitr_verify_last_problems",
            "Problems the last `pgpitr verify` found",
            int(v.last.problems),
        );
        if let Some(ok) = v.last_success {
            b.float(
                "pgpitr_verify_last_success_timestamp_seconds",
                "When the last `pgpitr verify` that passed ended (Unix seconds)",
                seconds(ok),
            );
        }
    }
    if let Some(d) = &f.drill {
        b.float(
            "pgpitr_drill_last_run_timestamp_seconds",
            "When the last `pgpitr drill` ended (Unix seconds)",
            seconds(d.last.finished_at),
        );
        b.float(
            "pgpitr_drill_last_rto_seconds",
            "Recovery time measured by the last `pgpitr drill` (restore + recovery), in seconds",
            d.last.rto_seconds,
        );
        if let Some(ok) = d.last_success {
            b.float(
                "pgpitr_drill_last_success_timestamp_seconds",
                "When the last `pgpitr drill` that passed ended (Unix seconds)",
                seconds(ok),
            );
        }
    }
    b.float(
        "pgpitr_scan_duration_seconds",
        "How long the scan of the repository took, in seconds",
        f.scan_seconds,
    );
    b.float(
        "pgpitr_scan_timestamp_seconds",
        "When the scan of the repository ran (Unix seconds)",
        seconds(f.scanned_at),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::facts::tests::at;
    use crate::monitor::facts::{BackupFact, WalFact};
    use crate::pg::TimelineId;
    use crate::repo::manifest::BackupId;

    fn facts() -> Facts {
        let backup = |id: &str, stop: &str, size| BackupFact {
            id: BackupId(id.into()),
            start_time: at(stop) - jiff::SignedDuration::from_secs(30),
            stop_time: at(stop),
            size_bytes: size,
        };
        Facts {
            scanned_at: at("2026-11-30T12:00:00Z"),
            scan_seconds: 0.25,
            backups: vec![
                backup("20261128T000000Z", "2026-11-28T00:01:00Z", 100),
                backup("20261129T000000Z", "2026-11-29T00:01:00Z", 200),
            ],
            wal: vec![WalFact {
                timeline: TimelineId(2),
                file: "000000020000000000000042".into(),
                stored_at: at("2026-11-30T11:59:00Z"),
            }],
            windows: Vec::new(),
            repository_bytes: 12345,
            written_last_7d_bytes: 345,
            verify: None,
            drill: None,
        }
    }

    /// `name{labels} value` lines, without comments.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn facts_become_series_and_missing_facts_none() {
        let text = encode("s3://bucket/prefix", Ok(&facts()));
        let s = samples(&text);
        assert!(
            s.contains(&"pgpitr_repository_up{repository=\"s3://bucket/prefix\"} 1"),
            "{text}"
        );
        assert!(s.contains(&"pgpitr_backups{repository=\"s3://bucket/prefix\"} 2"));
        assert!(s.contains(&"pgpitr_backup_last_size_bytes{repository=\"s3://bucket/prefix\"} 200"));
        assert!(
            s.contains(&"pgpitr_backup_previous_size_bytes{repository=\"s3://bucket/prefix\"} 100")
        );
        assert!(s.iter().any(|l| l.starts_with(
            "pgpitr_wal_last_archived_timestamp_seconds{repository=\"s3://bucket/prefix\",timeline=\"2\"} 1796"
        )), "{text}");
        for absent in ["pgpitr_verify_", "pgpitr_drill_", "pgpitr_recovery_window_"] {
            assert!(!text.contains(absent), "{absent}: {text}");
        }
    }

    #[test]
    fn a_failed_scan_is_up_0_alone() {
        let text = encode("/var/lib/pgpitr", Err(()));
        assert_eq!(
            samples(&text),
            vec!["pgpitr_repository_up{repository=\"/var/lib/pgpitr\"} 0"]
        );
    }
}
