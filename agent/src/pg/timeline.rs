//! `TimelineId`: PostgreSQL's timeline number (`TimeLineID`, src/include/access/xlogdefs.h). The
//! first timeline is 1; every promotion or point-in-time recovery that ends starts a new one.

use std::fmt;
use std::str::FromStr;

use super::ParseError;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct TimelineId(pub u32);

impl TimelineId {
    /// The first timeline of every cluster.
    pub const FIRST: TimelineId = TimelineId(1);

    /// The 8-hex-digit form used in WAL file names (`00000001`).
    pub fn hex(self) -> String {
        format!("{:08X}", self.0)
    }
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for TimelineId {
    type Err = ParseError;

    /// Parses a decimal timeline number, as `recovery_target_timeline` takes it (1 or more).
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(TimelineId(n)),
            _ => Err(ParseError::new(
                "timeline",
                s,
                "a decimal number of 1 or more",
            )),
        }
    }
}
