//! Parsing of the `server_version` parameter into `server_version_num` form.
//!
//! The server reports `server_version` as a ParameterStatus at startup (e.g. `15.18`,
//! `17beta1`, `16.4 (Debian 16.4-1.pgdg120+1)`, `9.6.24`); `server_version_num` is not
//! reported, so it is computed here the way PostgreSQL defines it (src/include/pg_config.h
//! `PG_VERSION_NUM`): `major * 10000 + minor` from version 10 on, and
//! `major * 10000 + minor * 100 + patch` before.

/// Computes the numeric version (`150018` for `15.18`) from a `server_version` string.
///
/// Pre-release suffixes count as `.0` (`17beta1` → `170000`, `18devel` → `180000`), and
/// anything after the first whitespace (distribution suffixes) is ignored. Returns `None` if
/// the string does not start with a version number.
pub fn parse_server_version_num(version: &str) -> Option<u32> {
    let token = version.split_whitespace().next()?;
    let numeric_len = token
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(token.len());
    let mut parts = token[..numeric_len].split('.');
    let major: u32 = parts.next()?.parse().ok()?;
    let mut next = || -> Option<u32> {
        match parts.next() {
            None | Some("") => Some(0),
            Some(p) => p.parse().ok(),
        }
    };
    if major >= 10 {
        let minor = next()?;
        if minor >= 10_000 || major > 400_000 {
            return None;
        }
        Some(major * 10_000 + minor)
    } else {
        let minor = next()?;
        let patch = next()?;
        if minor >= 100 || patch >= 100 {
            return None;
        }
        Some(major * 10_000 + minor * 100 + patch)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_server_version_num as p;

    #[test]
    fn parses_release_and_prerelease_versions() {
        assert_eq!(p("15.18"), Some(150018));
        assert_eq!(p("13.0"), Some(130000));
        assert_eq!(p("17beta1"), Some(170000));
        assert_eq!(p("18devel"), Some(180000));
        assert_eq!(p("14rc1"), Some(140000));
        assert_eq!(p("16.4 (Debian 16.4-1.pgdg120+1)"), Some(160004));
        assert_eq!(p("10.23"), Some(100023));
        assert_eq!(p("9.6.24"), Some(90624));
        assert_eq!(p("9.6beta1"), Some(90600));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(p(""), None);
        assert_eq!(p("PostgreSQL"), None);
        assert_eq!(p(".5"), None);
        assert_eq!(p("15.x"), Some(150000));
        assert_eq!(p("15.99999"), None);
    }
}
