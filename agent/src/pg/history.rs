//! Timeline history files (`00000002.history`): one line per ancestor timeline,
//! `<parent tli>\t<switch point LSN>\t<reason>`, comments with `#` and blank lines ignored
//! (src/backend/access/transam/timeline.c, `readTimeLineHistory`).

use super::{Lsn, ParseError, TimelineId};

/// One ancestor: WAL of `timeline` is valid up to (not including) `switch_point`, where the
/// next timeline in the history branched off.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimelineHistoryEntry {
    pub timeline: TimelineId,
    pub switch_point: Lsn,
    pub reason: String,
}

/// The parsed history of timeline `timeline`: its ancestors, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimelineHistory {
    pub timeline: TimelineId,
    pub ancestors: Vec<TimelineHistoryEntry>,
}

impl TimelineHistory {
    /// Parses the content of `<timeline>.history`.
    ///
    /// # Errors
    /// A line whose fields are not a timeline number and an LSN, parents that do not increase,
    /// or switch points that go backwards — `readTimeLineHistory` rejects the same.
    pub fn parse(timeline: TimelineId, text: &str) -> Result<Self, ParseError> {
        let mut ancestors: Vec<TimelineHistoryEntry> = Vec::new();
        for line in text.lines() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || {
                ParseError::new(
                    "timeline history line",
                    line,
                    "<parent timeline>\\t<switch LSN>\\t<reason>",
                )
            };
            let mut fields = line.splitn(3, |c: char| c.is_ascii_whitespace());
            let tli: u32 = fields.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
            let lsn: Lsn = fields
                .next()
                .and_then(|f| f.trim().parse().ok())
                .ok_or_else(bad)?;
            let reason = fields.next().unwrap_or("").trim().to_string();
            if let Some(prev) = ancestors.last() {
                if tli <= prev.timeline.0 || lsn < prev.switch_point {
                    return Err(ParseError::new(
                        "timeline history",
                        line,
                        "increasing timelines and switch points",
                    ));
                }
            }
            if tli >= timeline.0 {
                return Err(ParseError::new(
                    "timeline history",
                    line,
                    "ancestors older than the file's own timeline",
                ));
            }
            ancestors.push(TimelineHistoryEntry {
                timeline: TimelineId(tli),
                switch_point: lsn,
                reason,
            });
        }
        Ok(TimelineHistory {
            timeline,
            ancestors,
        })
    }

    /// The timeline whose WAL holds `lsn` on this history's branch: the first ancestor whose
    /// switch point lies after `lsn`, else this history's own timeline.
    pub fn timeline_at(&self, lsn: Lsn) -> TimelineId {
        self.ancestors
            .iter()
            .find(|e| lsn < e.switch_point)
            .map(|e| e.timeline)
            .unwrap_or(self.timeline)
    }

    /// Whether `tli` is this timeline or one of its ancestors.
    pub fn contains(&self, tli: TimelineId) -> bool {
        tli == self.timeline || self.ancestors.iter().any(|e| e.timeline == tli)
    }

    /// Where this branch left `tli` (`None` for the history's own timeline or a timeline not on it).
    pub fn switch_point_of(&self, tli: TimelineId) -> Option<Lsn> {
        self.ancestors
            .iter()
            .find(|e| e.timeline == tli)
            .map(|e| e.switch_point)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_SWITCHES: &str = "1\t0/3000158\tno recovery target specified\n\n# comment\n2\t0/5000000\tat restore point \"x\"\n";

    #[test]
    fn parses_postgresql_history_file() {
        let h = TimelineHistory::parse(TimelineId(3), TWO_SWITCHES).unwrap();
        assert_eq!(h.ancestors.len(), 2);
        assert_eq!(h.ancestors[0].switch_point, "0/3000158".parse().unwrap());
        assert_eq!(h.ancestors[1].reason, "at restore point \"x\"");
        assert_eq!(h.timeline_at("0/1000000".parse().unwrap()), TimelineId(1));
        assert_eq!(h.timeline_at("0/3000158".parse().unwrap()), TimelineId(2));
        assert_eq!(h.timeline_at("0/6000000".parse().unwrap()), TimelineId(3));
        assert!(h.contains(TimelineId(2)) && !h.contains(TimelineId(4)));
    }

    #[test]
    fn rejects_malformed_or_inconsistent_history() {
        for bad in [
            "x\t0/1\treason",
            "1\tnot-an-lsn\tr",
            "2\t0/5\tr\n1\t0/6\tr",
            "3\t0/1\tr",
        ] {
            assert!(TimelineHistory::parse(TimelineId(3), bad).is_err(), "{bad}");
        }
    }
}

/// Hostile `.history` files: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// A consistent history of timeline `own`: increasing parents and switch points, reasons
    /// as PostgreSQL writes them (one line, no surrounding blanks).
    fn history() -> impl Strategy<Value = TimelineHistory> {
        proptest::collection::vec((1u32..1000, 0u64..1 << 40, "[a-zA-Z0-9_\" ]{0,40}"), 0..12)
            .prop_map(|steps| {
                let (mut tli, mut lsn) = (0u32, 0u64);
                let ancestors: Vec<TimelineHistoryEntry> = steps
                    .into_iter()
                    .map(|(dt, dl, reason)| {
                        tli += dt;
                        lsn += dl;
                        TimelineHistoryEntry {
                            timeline: TimelineId(tli),
                            switch_point: Lsn(lsn),
                            reason: reason.trim().to_string(),
                        }
                    })
                    .collect();
                TimelineHistory {
                    timeline: TimelineId(tli + 1),
                    ancestors,
                }
            })
    }

    /// The file as `writeTimeLineHistory` lays it out.
    fn render(h: &TimelineHistory) -> String {
        h.ancestors
            .iter()
            .map(|e| format!("{}\t{}\t{}\n", e.timeline.0, e.switch_point, e.reason))
            .collect()
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(3000))]

        #[test]
        fn every_consistent_history_round_trips(h in history()) {
            prop_assert_eq!(TimelineHistory::parse(h.timeline, &render(&h)).unwrap(), h);
        }

        #[test]
        fn arbitrary_text_is_a_history_or_a_typed_error(
            tli in any::<u32>(),
            text in "\\PC{0,200}|([0-9]{1,11}[\t ][0-9A-Fa-f/]{0,19}[\t ]?\\PC{0,10}\n){0,6}",
        ) {
            if let Ok(h) = TimelineHistory::parse(TimelineId(tli), &text) {
                prop_assert!(h.ancestors.iter().all(|e| e.timeline.0 < tli));
                prop_assert!(h.ancestors.windows(2).all(|w| w[0].timeline < w[1].timeline
                    && w[0].switch_point <= w[1].switch_point));
            }
        }

        #[test]
        fn mutated_histories_never_panic(
            h in history(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = render(&h).into_bytes();
            if !bytes.is_empty() {
                for (at, b) in edits {
                    let at = at.index(bytes.len());
                    bytes[at] = b;
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            let _ = TimelineHistory::parse(h.timeline, &text);
        }
    }
}
