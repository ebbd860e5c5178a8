//! The archived WAL listing by name ([`WalIndex`]), and [`walk`]: the segments replay reads
//! along a branch until a bound or the first segment the archive lacks. `.partial` files never
//! count as segments.

use std::collections::HashMap;

use super::error::PlanError;
use super::timelines::Branch;
use crate::pg::{WalFileName, WalSegSize, WalSegmentName};
use crate::repo::wal::ArchivedWal;

/// The archived WAL listing by name.
pub(crate) struct WalIndex<'a> {
    by_name: HashMap<WalFileName, Vec<&'a ArchivedWal>>,
}

impl<'a> WalIndex<'a> {
    pub(crate) fn new(wal: &'a [ArchivedWal]) -> Self {
        let mut by_name: HashMap<WalFileName, Vec<&ArchivedWal>> = HashMap::new();
        for w in wal {
            let versions = by_name.entry(w.name).or_default();
            if !versions.iter().any(|v| v.content_id == w.content_id) {
                versions.push(w);
            }
        }
        WalIndex { by_name }
    }

    pub(crate) fn contains(&self, name: WalFileName) -> bool {
        self.by_name.contains_key(&name)
    }

    /// The one stored version of `name`.
    pub(super) fn get(&self, name: WalFileName) -> Result<Option<&'a ArchivedWal>, PlanError> {
        match self.by_name.get(&name).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([one]) => Ok(Some(*one)),
            Some(more) => Err(PlanError::AmbiguousWal {
                name,
                count: more.len(),
            }),
        }
    }

    /// The highest archived segment number that `branch` would read from its own file list,
    /// i.e. some segment `s` with `branch.timeline_of_segment(s) == s.timeline`.
    pub(super) fn last_on_branch(
        &self,
        branch: &Branch,
        seg_size: WalSegSize,
    ) -> Option<WalSegmentName> {
        self.by_name
            .keys()
            .filter_map(|n| match n {
                WalFileName::Segment(s) => Some(*s),
                _ => None,
            })
            .filter(|s| branch.timeline_of_segment(s.segno(seg_size), seg_size) == s.timeline)
            .max_by_key(|s| s.segno(seg_size))
    }
}

/// The segments replay reads from segment number `from` on along `branch`, stopping after
/// `through` (when given) or before the first segment the archive lacks.
pub(crate) struct Walk {
    pub(crate) segments: Vec<WalSegmentName>,
    pub(crate) first_missing: Option<WalSegmentName>,
}

pub(crate) fn walk(
    branch: &Branch,
    index: &WalIndex<'_>,
    seg_size: WalSegSize,
    from: u64,
    through: Option<u64>,
) -> Walk {
    let mut segments = Vec::new();
    let mut segno = from;
    loop {
        if through.is_some_and(|t| segno > t) {
            return Walk {
                segments,
                first_missing: None,
            };
        }
        let tli = branch.timeline_of_segment(segno, seg_size);
        let name = WalSegmentName::from_segno(tli, segno, seg_size);
        // Only complete segments: a `.partial` is never a substitute.
        if !index.contains(WalFileName::Segment(name)) {
            return Walk {
                segments,
                first_missing: Some(name),
            };
        }
        segments.push(name);
        segno += 1;
    }
}
