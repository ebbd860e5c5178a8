//! Keeps docs/reliability.md true: every test its fault table names exists, and its list of
//! property-tested parsers is exactly the modules that have property tests.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `a::b` names in backticks in `line`.
fn names(line: &str) -> Vec<&str> {
    line.split('`')
        .skip(1)
        .step_by(2)
        .filter(|n| n.contains("::"))
        .collect()
}

/// Where test `name` (`file::function` of `tests/tests`, or `module::path::tests::function`
/// under `agent/src`) must be defined.
fn test_source(root: &Path, name: &str) -> (PathBuf, String) {
    let parts: Vec<&str> = name.split("::").collect();
    let function = parts.last().unwrap().to_string();
    let e2e = root.join("tests/tests").join(format!("{}.rs", parts[0]));
    if parts.len() == 2 && e2e.exists() {
        return (e2e, function);
    }
    assert!(
        parts.len() >= 3 && parts[parts.len() - 2] == "tests",
        "{name}: neither tests/tests/<file>.rs::function nor module::tests::function"
    );
    (module_source(root, &parts[..parts.len() - 2]), function)
}

/// The source file of module `path` of the `pgpitr` library.
fn module_source(root: &Path, path: &[&str]) -> PathBuf {
    let base = root.join("agent/src").join(path.join("/"));
    let file = base.with_extension("rs");
    if file.exists() {
        file
    } else {
        base.join("mod.rs")
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_test_named_in_reliability_md_exists() {
    let root = workspace();
    let doc = std::fs::read_to_string(root.join("docs/reliability.md")).unwrap();
    let mut checked = 0;
    for line in doc.lines().filter(|l| l.starts_with('|')) {
        let Some(last) = line.trim_end_matches('|').rsplit('|').next() else {
            continue;
        };
        for name in names(last) {
            let (file, function) = test_source(&root, name);
            let source = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{name}: {}: {e}", file.display()));
            assert!(
                source.contains(&format!("fn {function}(")),
                "docs/reliability.md names {name}, which {} does not define",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 30,
        "only {checked} tests named in the fault table"
    );
}

#[test]
fn reliability_md_lists_exactly_the_property_tested_parsers() {
    let root = workspace();
    let doc = std::fs::read_to_string(root.join("docs/reliability.md")).unwrap();
    let section = doc
        .split("## Hostile input")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Hostile input section");
    let mut listed: Vec<PathBuf> = section
        .lines()
        .filter(|l| l.starts_with("- "))
        .flat_map(|l| {
            // `- what is parsed: `module`, `module``: the modules come after the colon.
            l.rsplit(": ")
                .next()
                .unwrap()
                .split('`')
                .skip(1)
                .step_by(2)
                .map(|m| module_source(&root, &m.split("::").collect::<Vec<_>>()))
                .collect::<Vec<_>>()
        })
        .collect();
    listed.sort();
    let mut files = Vec::new();
    rust_files(&root.join("agent/src"), &mut files);
    let mut tested: Vec<PathBuf> = files
        .into_iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .contains("mod proptests {")
        })
        .collect();
    tested.sort();
    assert_eq!(
        listed, tested,
        "docs/reliability.md's list of property-tested parsers is out of date"
    );
}

/// The shipped alert rules load (`promtool check rules`) and their unit tests pass
/// (`promtool test rules`): each alert fires on synthetic series and resolves. promtool comes
/// with Debian's `prometheus` package, which `scripts/test` installs.
#[test]
fn shipped_alert_rules_pass_promtool_check_and_unit_tests() {
    let dir = workspace().join("docs/monitoring");
    for args in [
        &["check", "rules", "pgpitr-alerts.yml"][..],
        &[
            "test",
            "rules",
            "pgpitr-alerts.test.yml",
            "pgpitr-alerts.days.test.yml",
        ],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("promtool (Debian package prometheus, installed by scripts/test): {e}")
            });
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
