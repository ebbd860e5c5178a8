//! `pgpitr metrics --listen`: a small HTTP/1 server that answers `GET /metrics` with the
//! exposition of a scan at most `cache` old (so that scrapes do not list the repository each
//! time; concurrent scrapes wait for one scan) and 404 for any other path.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{metrics, scan};
use crate::storage::DynStorage;

/// The content type of [`metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scans the repository and encodes the result, and whether the scan succeeded; a failed scan
/// is `pgpitr_repository_up 0` (and a warning in the log with the reason).
pub async fn exposition(storage: &DynStorage) -> (String, bool) {
    let repository = storage.location();
    match scan::scan(storage.as_ref()).await {
        Ok(facts) => (metrics::encode(&repository, Ok(&facts)), true),
        Err(e) => {
            tracing::warn!("scan of the repository failed: {e}");
            (metrics::encode(&repository, Err(())), false)
        }
    }
}

/// The last exposition and when it was made.
#[derive(Debug)]
pub struct Cache {
    storage: DynStorage,
    max_age: Duration,
    last: tokio::sync::Mutex<Option<(Instant, String)>>,
}

impl Cache {
    pub fn new(storage: DynStorage, max_age: Duration) -> Cache {
        Cache {
            storage,
            max_age,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The cached exposition, or a new one when it is older than the cache's `max_age`.
    pub async fn get(&self) -> String {
        let mut last = self.last.lock().await;
        if let Some((at, text)) = last.as_ref() {
            if at.elapsed() < self.max_age {
                return text.clone();
            }
        }
        let (text, _) = exposition(&self.storage).await;
        *last = Some((Instant::now(), text.clone()));
        text
    }
}

async fn handle(
    req: Request<Incoming>,
    cache: Arc<Cache>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = if req.uri().path() == "/metrics"
        && (req.method() == Method::GET || req.method() == Method::HEAD)
    {
        Response::builder()
            .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(Full::new(Bytes::from(cache.get().await)))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(
                b"not found: the metrics are at /metrics\n",
            )))
    };
    Ok(response.expect("a valid response"))
}

/// Serves `/metrics` on `listener` until `shutdown` completes.
///
/// # Errors
/// Accepting connections failed.
pub async fn serve(
    listener: TcpListener,
    cache: Arc<Cache>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted?.0,
            () = &mut shutdown => return Ok(()),
        };
        let cache = cache.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, cache.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}
