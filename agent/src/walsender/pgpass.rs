//! Password file (`~/.pgpass`, `PGPASSFILE`) lookup, following libpq.
//!
//! Format (PostgreSQL docs, "The Password File"; libpq `passwordFromFile()` in
//! src/interfaces/libpq/fe-connect.c): one entry per line,
//! `hostname:port:database:username:password`. A field that is exactly `*` matches anything;
//! `\:` and `\\` escape a colon and a backslash. Blank lines and lines starting with `#` are
//! skipped; the first matching line wins. The password ends at the first unescaped colon.
//!
//! Like libpq, a file that is not a regular file, or that is readable, writable or executable by
//! group or others (mode & 0o077 != 0), is ignored with a warning.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What the password is looked up for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PgpassQuery<'a> {
    /// Host as matched: `localhost` for the default socket directory.
    pub host: &'a str,
    pub port: &'a str,
    pub dbname: &'a str,
    pub user: &'a str,
}

/// Reads `path` and returns the password of the first matching entry.
///
/// A missing, unreadable, non-regular or too-permissive file yields `None` (the last with a
/// warning on the `tracing` log, as libpq prints one).
pub(crate) fn lookup_file(path: &Path, query: PgpassQuery<'_>) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    if !meta.is_file() {
        tracing::warn!(
            "password file {:?} is not a plain file; ignoring it",
            path.display()
        );
        return None;
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {:?} has group or world access; permissions should be u=rw (0600) \
             or less; ignoring it",
            path.display()
        );
        return None;
    }
    let content = fs::read(path).ok()?;
    lookup_str(&String::from_utf8_lossy(&content), query)
}

/// Returns the password of the first line of `content` that matches `query`.
pub(crate) fn lookup_str(content: &str, query: PgpassQuery<'_>) -> Option<String> {
    let wanted = [query.host, query.port, query.dbname, query.user];
    content.lines().find_map(|line| {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        match_line(line, &wanted)
    })
}

/// Matches the four key fields of one line; returns the de-escaped password on a match.
fn match_line(line: &str, wanted: &[&str; 4]) -> Option<String> {
    let mut rest = line;
    for want in wanted {
        let (field, after) = split_field(rest)?;
        if !(field.wildcard || field.value == *want) {
            return None;
        }
        rest = after;
    }
    // The password runs to the next unescaped colon or the end of the line.
    let (password, _) = match split_field(rest) {
        Some((field, after)) => (field.value, after),
        None => (unescape(rest), ""),
    };
    Some(password)
}

struct Field {
    /// The field is exactly `*` (unescaped).
    wildcard: bool,
    value: String,
}

/// Splits off one colon-terminated field; `None` if there is no unescaped colon.
fn split_field(s: &str) -> Option<(Field, &str)> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, escaped)) => value.push(escaped),
                None => value.push('\\'),
            },
            ':' => {
                let wildcard = &s[..i] == "*";
                return Some((Field { wildcard, value }, &s[i + 1..]));
            }
            c => value.push(c),
        }
    }
    None
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.push(chars.next().unwrap_or('\\'));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn q<'a>(host: &'a str, port: &'a str, db: &'a str, user: &'a str) -> PgpassQuery<'a> {
        PgpassQuery {
            host,
            port,
            dbname: db,
            user,
        }
    }

    #[test]
    fn first_matching_line_wins_and_wildcards_match() {
        let file = "# comment\n\
                    \n\
                    otherhost:5432:*:backup:wrong\n\
                    db1:5432:replication:backup:s3cret\n\
                    *:*:*:backup:fallback\n";
        assert_eq!(
            lookup_str(file, q("db1", "5432", "replication", "backup")).as_deref(),
            Some("s3cret")
        );
        assert_eq!(
            lookup_str(file, q("db2", "5433", "postgres", "backup")).as_deref(),
            Some("fallback")
        );
        assert_eq!(
            lookup_str(file, q("db2", "5433", "postgres", "alice")),
            None
        );
    }

    #[test]
    fn escapes_are_honoured() {
        let file = "fe80\\:\\:1:5432:*:u:pa\\:ss\\\\word:ignored\n";
        assert_eq!(
            lookup_str(file, q("fe80::1", "5432", "x", "u")).as_deref(),
            Some("pa:ss\\word")
        );
        // An escaped star is a literal star, not a wildcard.
        let file = "\\*:5432:*:u:pw\n";
        assert_eq!(lookup_str(file, q("db1", "5432", "x", "u")), None);
        assert_eq!(
            lookup_str(file, q("*", "5432", "x", "u")).as_deref(),
            Some("pw")
        );
    }

    #[test]
    fn short_lines_and_crlf() {
        let file = "db1:5432:x:u\r\ndb1:5432:x:u:pw\r\n";
        assert_eq!(
            lookup_str(file, q("db1", "5432", "x", "u")).as_deref(),
            Some("pw")
        );
        assert_eq!(lookup_str("*:*:*:*", q("a", "1", "b", "c")), None);
    }

    #[test]
    fn file_with_group_or_world_access_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        fs::write(&path, "*:*:*:*:pw\n").unwrap();
        let query = q("h", "5432", "d", "u");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(lookup_file(&path, query).as_deref(), Some("pw"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(lookup_file(&path, query), None);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o604)).unwrap();
        assert_eq!(lookup_file(&path, query), None);
        assert_eq!(lookup_file(&dir.path().join("missing"), query), None);
        assert_eq!(lookup_file(dir.path(), query), None);
    }
}
