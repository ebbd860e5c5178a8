//! What `pgpitr restore` tells PostgreSQL, as text: the block appended to the restored
//! `postgresql.auto.conf`, the repository configuration file `restore_command` reads, and a
//! remapped `tablespace_map`. Pure functions; the restore writes their output.
//!
//! Rules:
//! - the block is appended after the backup's own `postgresql.auto.conf`, which PostgreSQL reads
//!   after `postgresql.conf`, and within one file the last line for a setting wins — so these
//!   settings override whatever the source server had;
//! - PostgreSQL refuses more than one `recovery_target*` setting ("multiple recovery targets
//!   specified", xlogrecovery.c), so every target setting this restore does not use is written
//!   as `''`, neutralising any left in the backup's configuration;
//! - `recovery_target_action` is always written explicitly;
//! - `archive_mode = 'off'` unless the source's archiving is preserved on purpose: a restored
//!   copy that promotes starts a new timeline, and archiving it into the source's repository
//!   would make that branch the "latest" timeline of every later restore of the source;
//! - no secret is ever written: the repository file holds only the repository's location and
//!   tuning keys ([`Config`] has no credential fields; S3 credentials come from the standard AWS
//!   chain of whoever runs the server).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::Serialize;

use super::plan::RecoveryPlan;
use super::target::quote_setting;
use crate::config::Config;

/// The name of the repository configuration file written into a restored data directory and
/// named by its `restore_command`.
pub const RESTORE_CONFIG_FILE: &str = "pgpitr-restore.toml";

/// Every recovery target setting PostgreSQL has; at most one may be non-empty.
const TARGET_SETTINGS: [&str; 5] = [
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
];

/// `recovery_target_action`: what the server does once the target is reached (docs, "Recovery
/// Target"). Ignored by PostgreSQL when there is no target (latest): recovery then ends at the
/// end of the archived WAL and the server promotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetAction {
    /// Stay in recovery, read-only (with `hot_standby`), until `pg_wal_replay_resume()`
    /// promotes: lets one check the data before committing to a new timeline. PostgreSQL's
    /// default, and pgpitr's.
    #[default]
    Pause,
    /// End recovery and open for writes on a new timeline.
    Promote,
    /// Stop the server; starting it again replays to the same point (with `recovery.signal`
    /// still present) — used to prepare a data directory for later.
    Shutdown,
}

impl fmt::Display for TargetAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetAction::Pause => "pause",
            TargetAction::Promote => "promote",
            TargetAction::Shutdown => "shutdown",
        })
    }
}

/// What happens to the source's WAL archiving settings in the restored copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveMode {
    /// `archive_mode = 'off'`: the copy archives nowhere.
    #[default]
    Off,
    /// Keep the source's `archive_mode` / `archive_command`: a promoted copy archives its new
    /// timeline wherever the source archived (with pgpitr, the same repository).
    Preserve,
}

impl fmt::Display for ArchiveMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArchiveMode::Off => "off",
            ArchiveMode::Preserve => "preserve",
        })
    }
}

/// `restore_command` for a restored server: `<bin> --config <config> %f %p`, each path quoted
/// for `/bin/sh` (PostgreSQL runs the command through the shell) and with `%` doubled (the only
/// escape PostgreSQL's `%` substitution knows, `BuildRestoreCommand`).
pub fn restore_command(bin: &Path, config: &Path) -> String {
    format!(
        "{} --config {} %f %p",
        percent_escape(&shell_quote(&bin.to_string_lossy())),
        percent_escape(&shell_quote(&config.to_string_lossy()))
    )
}

/// `s` as one `/bin/sh` word: unchanged when it holds only characters the shell never treats
/// specially, else in single quotes (`'` written as `'\''`).
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,=@".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn percent_escape(s: &str) -> String {
    s.replace('%', "%%")
}

/// The repository keys `restore_command` needs — location and restore tuning, never
/// credentials — as the TOML file [`RESTORE_CONFIG_FILE`].
#[derive(Debug, Serialize)]
struct RestoreConfig<'a> {
    repo: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    s3_endpoint: Option<&'a str>,
    s3_region: &'a str,
    s3_force_path_style: bool,
    s3_timeout: &'a str,
    s3_retries: u32,
    restore_prefetch: u32,
    restore_parallel: u32,
    /// The passphrase file's path (never its contents), absolute: the restored server reads
    /// the encrypted repository with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption_passphrase_file: Option<String>,
}

/// The content of [`RESTORE_CONFIG_FILE`] for `config`: what the restore itself used to reach
/// the repository, so that a server started later by plain `pg_ctl`, without any `PGPITR_*`
/// variable, fetches its WAL from the same place. Spool and archive settings are left at their
/// defaults (the spool defaults to the restored `pg_wal`).
pub fn restore_config_toml(config: &Config, backup: &str, when: Timestamp) -> String {
    let body = toml::to_string(&RestoreConfig {
        repo: &config.repo,
        s3_endpoint: config.s3_endpoint.as_deref(),
        s3_region: &config.s3_region,
        s3_force_path_style: config.s3_force_path_style,
        s3_timeout: &config.s3_timeout,
        s3_retries: config.s3_retries,
        restore_prefetch: config.restore_prefetch,
        restore_parallel: config.restore_parallel,
        encryption_passphrase_file: config.encryption_passphrase_file.as_ref().map(|p| {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        }),
    })
    .expect("plain keys serialise");
    format!(
        "# written by `pgpitr restore` at {when} (backup {backup}) for this data directory's\n\
         # restore_command. No credentials: S3 uses the standard AWS credential chain of the user\n\
         # running the server (AWS_* variables, ~/.aws, instance roles).\n{body}"
    )
}

/// What [`auto_conf_block`] writes.
#[derive(Debug, Clone)]
pub struct AutoConf<'a> {
    pub plan: &'a RecoveryPlan,
    /// From [`restore_command`].
    pub restore_command: String,
    pub action: TargetAction,
    pub archive_mode: ArchiveMode,
    pub when: Timestamp,
}

/// The settings the restore appends to `postgresql.auto.conf`, `(name, unquoted value)` in the
/// order written; see the module documentation for why each is there.
pub fn auto_conf_settings(c: &AutoConf<'_>) -> Vec<(String, String)> {
    let mut out = vec![("restore_command".to_string(), c.restore_command.clone())];
    let planned = c.plan.recovery_settings();
    // The unused targets are cleared BEFORE the one set: PostgreSQL's assign hooks fail as soon
    // as one target kind is assigned (even '') while another kind is set
    // (`error_multiple_recovery_targets`, xlogrecovery.c), in file order.
    for name in TARGET_SETTINGS {
        if !planned.iter().any(|(k, _)| k == name) {
            out.push((name.to_string(), String::new()));
        }
    }
    out.extend(planned);
    out.push(("recovery_target_action".into(), c.action.to_string()));
    if c.archive_mode == ArchiveMode::Off {
        out.push(("archive_mode".into(), "off".into()));
    }
    out
}

/// The text appended to `postgresql.auto.conf`: a comment saying where it comes from, then
/// [`auto_conf_settings`], one `name = 'value'` line each.
pub fn auto_conf_block(c: &AutoConf<'_>) -> String {
    let mut out = format!(
        "\n# Added by `pgpitr restore` at {}: backup {}, target {}, timeline {}.\n\
         # These lines override the settings above and postgresql.conf; remove them once the\n\
         # restored server has finished recovery if it should archive or recover differently.\n",
        c.when, c.plan.backup.id, c.plan.spec.target, c.plan.target_timeline
    );
    if c.archive_mode == ArchiveMode::Preserve {
        out.push_str(
            "# archive_mode: preserved from the source server (--archive-mode preserve)\n",
        );
    }
    for (k, v) in auto_conf_settings(c) {
        out.push_str(&format!("{k} = {}\n", quote_setting(&v)));
    }
    out
}

/// Why a `tablespace_map` could not be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TablespaceMapError {
    #[error("tablespace_map line {line} is not '<oid> <path>': {text:?}")]
    Malformed { line: usize, text: String },
    #[error(
        "tablespace {0} is remapped with --tablespace-map but not in the backup's tablespace_map"
    )]
    UnknownOid(u32),
}

/// `original` (the backup's `tablespace_map`: one `<oid> <path>` line per tablespace, with `\`
/// escaping `\`, CR and LF in the path — `do_pg_backup_start` in xlog.c writes it,
/// `read_tablespace_map` reads it) with the paths of the remapped OIDs replaced. PostgreSQL
/// recreates the `pg_tblspc/<oid>` links from this file when recovery starts, so a remap must
/// be written here as well as into the links.
///
/// # Errors
/// A line without an OID, or a remapped OID the file does not list.
pub fn rewrite_tablespace_map(
    original: &str,
    remap: &HashMap<u32, PathBuf>,
) -> Result<String, TablespaceMapError> {
    let mut out = String::with_capacity(original.len());
    let mut seen = Vec::new();
    // Escaped newlines are part of a path: split only on unescaped LF.
    for (i, line) in split_unescaped_lines(original).into_iter().enumerate() {
        if line.is_empty() {
            continue;
        }
        let (oid, path) = line
            .split_once(' ')
            .and_then(|(o, p)| o.parse::<u32>().ok().map(|o| (o, p)))
            .ok_or_else(|| TablespaceMapError::Malformed {
                line: i + 1,
                text: line.to_string(),
            })?;
        match remap.get(&oid) {
            Some(new) => {
                out.push_str(&format!(
                    "{oid} {}\n",
                    escape_map_path(&new.to_string_lossy())
                ));
                seen.push(oid);
            }
            None => out.push_str(&format!("{oid} {path}\n")),
        }
    }
    if let Some(oid) = remap.keys().find(|o| !seen.contains(o)) {
        return Err(TablespaceMapError::UnknownOid(*oid));
    }
    Ok(out)
}

fn split_unescaped_lines(s: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, b) in s.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'\n' => {
                lines.push(s[start..i].trim_end_matches('\r'));
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        lines.push(&s[start..]);
    }
    lines
}

fn escape_map_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if matches!(c, '\n' | '\r' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::{Lsn, TimelineId, WalSegSize, WalSegmentName};
    use crate::recovery::plan::{BackupSummary, WalEnd};
    use crate::recovery::target::{RecoveryTarget, RecoveryTargetSpec, TargetTimeline};
    use crate::recovery::window::RecoverableWindow;
    use crate::repo::manifest::BackupId;

    fn plan_for(target: RecoveryTarget) -> RecoveryPlan {
        let t: Timestamp = "2026-11-23T08:00:00Z".parse().unwrap();
        let seg = WalSegmentName::from_segno(TimelineId(2), 9, WalSegSize::DEFAULT);
        RecoveryPlan {
            backup: BackupSummary {
                id: BackupId::parse("20261123T080000Z").unwrap(),
                label: "weekly".into(),
                start_lsn: Lsn(0x0500_0028),
                start_timeline: TimelineId(1),
                stop_lsn: Lsn(0x0500_0100),
                stop_timeline: TimelineId(1),
                start_time: t,
                stop_time: t,
                stop_next_xid: None,
                wal_segment_size: WalSegSize::DEFAULT,
                size_bytes: 1,
            },
            reason: "the newest backup".into(),
            spec: RecoveryTargetSpec::new(target, true, TargetTimeline::Latest),
            target_timeline: TimelineId(2),
            timeline_path: Vec::new(),
            segments: Vec::new(),
            history_files: Vec::new(),
            bytes_to_fetch: 0,
            end: WalEnd {
                last_segment: seg,
                end_lsn: seg.next(WalSegSize::DEFAULT).start_lsn(WalSegSize::DEFAULT),
                first_missing: None,
            },
            window: RecoverableWindow {
                timeline: TimelineId(2),
                earliest: None,
                latest: None,
                restorable: Vec::new(),
                incomplete: Vec::new(),
                ranges: Vec::new(),
            },
            notes: Vec::new(),
        }
    }

    fn block(plan: &RecoveryPlan, action: TargetAction, archive: ArchiveMode) -> String {
        auto_conf_block(&AutoConf {
            plan,
            restore_command: restore_command(
                Path::new("/usr/bin/pgpitr-restore"),
                Path::new("/srv/pg/restore/pgpitr-restore.toml"),
            ),
            action,
            archive_mode: archive,
            when: "2026-11-23T09:20:00Z".parse().unwrap(),
        })
    }

    /// The settings as PostgreSQL would end up with them: for each name only the last line
    /// counts, and those are applied in file order, failing like PostgreSQL's assign hooks
    /// when a target kind is assigned while another kind is set.
    fn effective(text: &str) -> HashMap<String, String> {
        let mut lines: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').unwrap();
            let v = v.trim();
            assert!(v.starts_with('\'') && v.ends_with('\''), "{line}");
            let v = v[1..v.len() - 1].replace("''", "'").replace("\\\\", "\\");
            lines.retain(|(name, _)| name != k.trim());
            lines.push((k.trim().to_string(), v));
        }
        let mut set: Option<String> = None;
        for (k, v) in &lines {
            if TARGET_SETTINGS.contains(&k.as_str()) {
                if set.as_ref().is_some_and(|s| s != k) {
                    panic!("multiple recovery targets specified: {k} after {set:?}\n{text}");
                }
                set = (!v.is_empty()).then(|| k.clone());
            }
        }
        lines.into_iter().collect()
    }

    #[test]
    fn time_target_block_sets_exactly_one_target_and_an_explicit_action() {
        let t = crate::recovery::target::parse_target_time_in(
            "2026-11-23 10:14:59.5+01",
            &jiff::tz::TimeZone::UTC,
        )
        .unwrap();
        let plan = plan_for(RecoveryTarget::Time(t));
        let text = block(&plan, TargetAction::Promote, ArchiveMode::Off);
        let s = effective(&text);
        assert_eq!(s["recovery_target_time"], "2026-11-23 09:14:59.500000+00");
        assert_eq!(s["recovery_target_inclusive"], "true");
        assert_eq!(
            s["recovery_target_timeline"], "2",
            "resolved, never 'latest'"
        );
        assert_eq!(s["recovery_target_action"], "promote");
        assert_eq!(s["archive_mode"], "off");
        assert_eq!(
            s["restore_command"],
            "/usr/bin/pgpitr-restore --config /srv/pg/restore/pgpitr-restore.toml %f %p"
        );
        for other in [
            "recovery_target",
            "recovery_target_lsn",
            "recovery_target_name",
            "recovery_target_xid",
        ] {
            assert_eq!(s[other], "", "{other} neutralised");
        }
        assert!(
            text.starts_with('\n'),
            "never glued to a last line without newline"
        );
    }

    #[test]
    fn block_overrides_conflicting_settings_of_the_backup() {
        // A backup of a server that was itself restored once: its auto.conf names an xid target
        // and archives. Appending must leave exactly our target in force.
        let backup_auto_conf = "# Do not edit this file manually!\n\
            recovery_target_xid = '1234'\nrecovery_target_action = 'shutdown'\narchive_mode = 'on'\n";
        let plan = plan_for(RecoveryTarget::Lsn(Lsn(0x0600_0000)));
        let text = format!(
            "{backup_auto_conf}{}",
            block(&plan, TargetAction::Pause, ArchiveMode::Off)
        );
        let s = effective(&text);
        let set: Vec<_> = TARGET_SETTINGS
            .iter()
            .filter(|k| !s[**k].is_empty())
            .collect();
        assert_eq!(set, [&"recovery_target_lsn"]);
        assert_eq!(s["recovery_target_lsn"], "0/6000000");
        assert_eq!(s["recovery_target_action"], "pause");
        assert_eq!(s["archive_mode"], "off");
    }

    #[test]
    fn preserve_leaves_archiving_alone_and_latest_has_no_target() {
        let plan = plan_for(RecoveryTarget::Latest);
        let s = effective(&block(&plan, TargetAction::Pause, ArchiveMode::Preserve));
        assert!(!s.contains_key("archive_mode"));
        assert!(TARGET_SETTINGS.iter().all(|k| s[*k].is_empty()));
        assert_eq!(s["recovery_target_action"], "pause");
        let s = effective(&block(
            &plan_for(RecoveryTarget::Immediate),
            TargetAction::Shutdown,
            ArchiveMode::Off,
        ));
        assert_eq!(s["recovery_target"], "immediate");
        assert_eq!(s["recovery_target_action"], "shutdown");
    }

    #[test]
    fn restore_command_quotes_for_the_shell_and_escapes_percent() {
        assert_eq!(
            restore_command(
                Path::new("/opt/pg pitr/bin/pgpitr-restore"),
                Path::new("/srv/it's 100%/pgpitr-restore.toml")
            ),
            "'/opt/pg pitr/bin/pgpitr-restore' --config '/srv/it'\\''s 100%%/pgpitr-restore.toml' %f %p"
        );
        // and the whole survives PostgreSQL's quoting
        let line = quote_setting(&restore_command(
            Path::new("/usr/bin/pgpitr-restore"),
            Path::new("/a'b/c.toml"),
        ));
        assert_eq!(
            line,
            "'/usr/bin/pgpitr-restore --config ''/a''\\\\''''b/c.toml'' %f %p'"
        );
    }

    #[test]
    fn no_secret_is_ever_written() {
        // Credentials live in the AWS chain, never in the configuration; nothing that looks like
        // one (the AWS secret of the e2e tests' style, a conninfo password) may be written.
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let env: Vec<(String, String)> = [
            ("PGPITR_REPO", "s3://bucket/prod"),
            ("PGPITR_S3_ENDPOINT", "http://127.0.0.1:3900"),
            ("PGPITR_S3_REGION", "garage"),
            ("PGPITR_S3_FORCE_PATH_STYLE", "true"),
            ("PGPITR_S3_TIMEOUT", "7s"),
            ("PGPITR_S3_RETRIES", "9"),
            (
                "PGPITR_CONNINFO",
                "host=/run/postgresql user=postgres password=hunter2",
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = Config::from_parts(None, None, &env).unwrap();
        let toml_text = restore_config_toml(&config, "20261123T080000Z", Timestamp::UNIX_EPOCH);
        let plan = plan_for(RecoveryTarget::Latest);
        let conf = block(&plan, TargetAction::Promote, ArchiveMode::Off);
        for text in [&toml_text, &conf] {
            assert!(!text.contains(secret), "{text}");
            assert!(!text.contains("hunter2"), "conninfo is not copied: {text}");
            assert!(
                !text.to_ascii_lowercase().contains("secret_access"),
                "{text}"
            );
        }
        // The file is a valid configuration that reaches the same repository.
        let back = Config::from_parts(None, Some(&toml_text), &[]).unwrap();
        assert_eq!(back.repo, "s3://bucket/prod");
        assert_eq!(back.s3_endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(back.s3_region, "garage");
        assert!(back.s3_force_path_style);
        assert_eq!((back.s3_timeout.as_str(), back.s3_retries), ("7s", 9));
        assert_eq!(back.conninfo, "");
        assert_eq!(back.encryption_passphrase_file, None);
        // An encrypted repository: the passphrase file's path, never the passphrase.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("passphrase");
        std::fs::write(&file, "Zq7passphrase\n").unwrap();
        let mut config = config;
        config.encryption_passphrase_file = Some(file.clone());
        let toml_text = restore_config_toml(&config, "20261123T080000Z", Timestamp::UNIX_EPOCH);
        assert!(!toml_text.contains("Zq7passphrase"), "{toml_text}");
        let back = Config::from_parts(None, Some(&toml_text), &[]).unwrap();
        assert_eq!(back.encryption_passphrase_file, Some(file));
    }

    #[test]
    fn tablespace_map_remaps_only_the_given_oids() {
        let original = "16385 /srv/ts/one\n16386 /srv/ts/with\\\nnewline\n";
        let remap = HashMap::from([(16385, PathBuf::from("/restore/ts one"))]);
        assert_eq!(
            rewrite_tablespace_map(original, &remap).unwrap(),
            "16385 /restore/ts one\n16386 /srv/ts/with\\\nnewline\n"
        );
        let remap = HashMap::from([(16386, PathBuf::from("/r/a\\b"))]);
        assert_eq!(
            rewrite_tablespace_map(original, &remap).unwrap(),
            "16385 /srv/ts/one\n16386 /r/a\\\\b\n"
        );
        assert_eq!(
            rewrite_tablespace_map(original, &HashMap::from([(1, PathBuf::from("/x"))])),
            Err(TablespaceMapError::UnknownOid(1))
        );
        assert!(matches!(
            rewrite_tablespace_map("abc /x\n", &HashMap::new()),
            Err(TablespaceMapError::Malformed { line: 1, .. })
        ));
    }
}
