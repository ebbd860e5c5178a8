//! Monitoring: what `pgpitr status` and `pgpitr metrics` report. `scan` reads the repository
//! (the only I/O), `facts` derives what is known from that, `checks` judges it against the
//! thresholds (Nagios levels), `metrics` exports it for Prometheus and `serve` answers scrapes.

pub mod checks;
pub mod facts;
pub mod metrics;
pub mod scan;
pub mod serve;
