//! A fault-injecting HTTP/1.1 proxy on loopback, in front of an S3 server (the shared Garage).
//! pgpitr's `s3_endpoint` points at the proxy; requests and answers pass through byte for byte
//! (SigV4 signs the `Host` header, which the server checks against what it receives: the
//! proxy's address, as the client signed it). Per request, with probability `rate`, one
//! [`Fault`] is injected instead, decided by a seeded RNG (the seed is printed, and
//! `FAULT_SEED` replays the same choices, up to the order of concurrent requests).
//! [`FaultProxy::count`] tells how often each fault happened. With [`FaultProxy::record`], it
//! also keeps every request's method, target and headers ([`Seen`]), to check what pgpitr sends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to a request instead of passing it through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `500 InternalError`, without forwarding the request.
    InternalError,
    /// `503 SlowDown`, without forwarding the request.
    SlowDown,
    /// The request is forwarded (and may take effect), then the connection is reset before any
    /// answer.
    ResetBeforeResponse,
    /// The answer's headers and part of its body, then a reset.
    ResetMidResponse,
    /// The answer's headers (with the full `Content-Length`) and part of its body, then a clean
    /// close.
    TruncateResponse,
    /// No answer: the connection stays open, silent, until the client gives up.
    Stall,
    /// A reset while the request's body is still coming (nothing is forwarded).
    ResetMidRequest,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::InternalError,
        Fault::SlowDown,
        Fault::ResetBeforeResponse,
        Fault::ResetMidResponse,
        Fault::TruncateResponse,
        Fault::Stall,
        Fault::ResetMidRequest,
    ];

    fn index(self) -> usize {
        Fault::ALL.iter().position(|f| *f == self).unwrap()
    }
}

/// Which faults to inject and how often.
#[derive(Debug, Clone)]
struct Plan {
    /// Probability of a fault per request, 0.0..=1.0.
    rate: f64,
    /// The faults to choose among (uniformly).
    faults: Vec<Fault>,
}

struct Shared {
    upstream: SocketAddr,
    plan: Mutex<Plan>,
    rng: Mutex<u64>,
    counts: [AtomicU64; 7],
    requests: AtomicU64,
    /// Every request's head since [`FaultProxy::record`], when recording.
    seen: Mutex<Option<Vec<Seen>>>,
}

/// One request as the proxy received it (before any fault).
#[derive(Debug, Clone)]
pub struct Seen {
    /// `GET`, `PUT`, `POST`, ...
    pub method: String,
    /// The request target: path and query (`/bucket/key?uploads`).
    pub target: String,
    /// Names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    /// The value of header `name` (lower case), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The proxy; it runs on its own thread until the test process ends.
pub struct FaultProxy {
    pub port: u16,
    pub seed: u64,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://host:port`) injecting every kind of fault at `rate`.
    pub fn start(upstream: &str, rate: f64) -> FaultProxy {
        let given = std::env::var("FAULT_SEED").ok();
        let seed = given.and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                ^ u64::from(std::process::id())
        });
        eprintln!("fault proxy: seed {seed} (FAULT_SEED={seed} replays it)");
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream is http://ip:port");
        let shared = Arc::new(Shared {
            upstream,
            plan: Mutex::new(Plan {
                rate,
                faults: Fault::ALL.to_vec(),
            }),
            rng: Mutex::new(seed | 1),
            counts: Default::default(),
            requests: AtomicU64::new(0),
            seen: Mutex::new(None),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = shared.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let s = s.clone();
                    tokio::spawn(async move {
                        let _ = serve(s, client).await;
                    });
                }
            });
        });
        FaultProxy { port, seed, shared }
    }

    /// The endpoint to give pgpitr instead of the server's.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on, inject only `faults`, at `rate`.
    pub fn set_plan(&self, rate: f64, faults: &[Fault]) {
        *self.shared.plan.lock().unwrap() = Plan {
            rate,
            faults: faults.to_vec(),
        };
    }

    /// How often `fault` was injected.
    pub fn count(&self, fault: Fault) -> u64 {
        self.shared.counts[fault.index()].load(Ordering::SeqCst)
    }

    /// Requests seen, faulted or not.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// From now on, keep every request's head (see [`FaultProxy::seen`]); forgets those kept so
    /// far.
    pub fn record(&self) {
        *self.shared.seen.lock().unwrap() = Some(Vec::new());
    }

    /// The requests received since [`FaultProxy::record`], in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone().unwrap_or_default()
    }

    /// Every count, for messages.
    pub fn summary(&self) -> String {
        let counts: Vec<String> = Fault::ALL
            .iter()
            .map(|f| format!("{f:?}={}", self.count(*f)))
            .collect();
        format!(
            "seed {}, {} requests: {}",
            self.seed,
            self.requests(),
            counts.join(" ")
        )
    }
}

impl Shared {
    /// xorshift64*: a uniform float in 0..1.
    fn random(&self) -> f64 {
        let mut x = self.rng.lock().unwrap();
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The fault for the next request, if any: with probability `rate`, the least injected so
    /// far of the planned faults (ties broken at random), so that every kind happens within a
    /// few dozen faults; faults on a request body only for a request that has one.
    fn pick(&self, has_body: bool) -> Option<Fault> {
        let plan = self.plan.lock().unwrap().clone();
        if self.random() >= plan.rate {
            return None;
        }
        let choices: Vec<Fault> = plan
            .faults
            .into_iter()
            .filter(|f| has_body || *f != Fault::ResetMidRequest)
            .collect();
        let least = choices
            .iter()
            .map(|f| self.counts[f.index()].load(Ordering::SeqCst))
            .min()?;
        let choices: Vec<Fault> = choices
            .into_iter()
            .filter(|f| self.counts[f.index()].load(Ordering::SeqCst) == least)
            .collect();
        let i = (self.random() * choices.len() as f64) as usize;
        Some(choices[i.min(choices.len() - 1)])
    }

    fn injected(&self, fault: Fault) {
        self.counts[fault.index()].fetch_add(1, Ordering::SeqCst);
    }
}

/// One HTTP message as raw bytes: its head (up to the blank line) and its body as sent.
struct Message {
    head: Vec<u8>,
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<String> {
        String::from_utf8_lossy(&self.head)
            .lines()
            .skip(1)
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
    }

    fn seen(&self) -> Seen {
        let head = String::from_utf8_lossy(&self.head);
        let mut lines = head.lines();
        let mut first = lines.next().unwrap_or_default().split_whitespace();
        let method = first.next().unwrap_or_default().to_string();
        let target = first.next().unwrap_or_default().to_string();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Seen {
            method,
            target,
            headers,
        }
    }

    fn first_line(&self) -> String {
        String::from_utf8_lossy(&self.head)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

/// A connection reader with a buffer of what was read past the current message.
struct Reader {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Reader {
    /// Reads more bytes into the buffer; `false` at end of stream.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The head of the next message, or `None` at a clean end of stream.
    async fn head(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(Some(self.buf.drain(..i + 4).collect()));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    async fn exactly(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn line(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return Ok(self.buf.drain(..i + 2).collect());
            }
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// The body after `head`, raw: `Content-Length` bytes, or chunks up to the last one (and
    /// its trailers), or nothing; with `to_eof`, everything until the peer closes.
    async fn body(&mut self, msg: &Message, to_eof: bool) -> std::io::Result<Vec<u8>> {
        if msg
            .header("transfer-encoding")
            .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
        {
            let mut body = Vec::new();
            loop {
                let line = self.line().await?;
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&line)
                        .trim()
                        .split(';')
                        .next()
                        .unwrap_or(""),
                    16,
                )
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
                body.extend_from_slice(&line);
                if size == 0 {
                    loop {
                        let trailer = self.line().await?;
                        body.extend_from_slice(&trailer);
                        if trailer == b"\r\n" {
                            return Ok(body);
                        }
                    }
                }
                body.extend_from_slice(&self.exactly(size + 2).await?);
            }
        }
        if let Some(n) = msg.header("content-length") {
            let n: usize = n.parse().map_err(|_| std::io::Error::other("bad length"))?;
            return self.exactly(n).await;
        }
        if to_eof {
            while self.fill().await? {}
            return Ok(std::mem::take(&mut self.buf));
        }
        Ok(Vec::new())
    }
}

/// Resets `stream` (RST, not FIN) by closing it with a zero linger.
fn reset(stream: TcpStream) {
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

fn error_response(status: &str, code: &str, message: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
    );
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves one client connection, request after request, over one upstream connection.
async fn serve(shared: Arc<Shared>, client: TcpStream) -> std::io::Result<()> {
    let mut client = Reader {
        stream: client,
        buf: Vec::new(),
    };
    let mut upstream: Option<Reader> = None;
    loop {
        let Some(head) = client.head().await? else {
            return Ok(());
        };
        let mut request = Message {
            head,
            body: Vec::new(),
        };
        shared.requests.fetch_add(1, Ordering::SeqCst);
        if let Some(seen) = shared.seen.lock().unwrap().as_mut() {
            seen.push(request.seen());
        }
        let has_body = request.header("content-length").is_some_and(|n| n != "0")
            || request.header("transfer-encoding").is_some();
        let fault = shared.pick(has_body);
        if request
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        {
            client
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await?;
        }
        if fault == Some(Fault::ResetMidRequest) {
            shared.injected(Fault::ResetMidRequest);
            // Let some of the body arrive, then reset while the rest is on its way.
            let _ = tokio::time::timeout(Duration::from_millis(50), client.fill()).await;
            reset(client.stream);
            return Ok(());
        }
        request.body = client.body(&request, false).await?;
        match fault {
            Some(Fault::InternalError) => {
                shared.injected(Fault::InternalError);
                client
                    .stream
                    .write_all(&error_response(
                        "500 Internal Server Error",
                        "InternalError",
                        "injected by the fault proxy",
                    ))
                    .await?;
                continue;
            }
            Some(Fault::SlowDown) => {
                shared.injected(Fault::SlowDown);
                client
                    .stream
                    .write_all(&error_response(
                        "503 Slow Down",
                        "SlowDown",
                        "Please reduce your request rate.",
                    ))
                    .await?;
                continue;
            }
            Some(Fault::Stall) => {
                shared.injected(Fault::Stall);
                // Silent until the client gives up (or ten minutes pass).
                let _ = tokio::time::timeout(Duration::from_secs(600), async {
                    while client.fill().await.unwrap_or(false) {}
                })
                .await;
                return Ok(());
            }
            _ => {}
        }
        // Forward, over the kept upstream connection if it is still there.
        let mut response = None;
        for _ in 0..2 {
            if upstream.is_none() {
                upstream = Some(Reader {
                    stream: TcpStream::connect(shared.upstream).await?,
                    buf: Vec::new(),
                });
            }
            let up = upstream.as_mut().unwrap();
            match exchange(up, &request).await {
                Ok(r) => {
                    response = Some(r);
                    break;
                }
                // A kept connection the server closed meanwhile: once more on a new one.
                Err(_) => upstream = None,
            }
        }
        let Some(response) = response else {
            reset(client.stream);
            return Ok(());
        };
        if response
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
        {
            upstream = None;
        }
        let body_faults = response.body.len() >= 2;
        match fault {
            Some(Fault::ResetBeforeResponse) => {
                shared.injected(Fault::ResetBeforeResponse);
                reset(client.stream);
                return Ok(());
            }
            Some(f @ (Fault::ResetMidResponse | Fault::TruncateResponse)) if body_faults => {
                shared.injected(f);
                client.stream.write_all(&response.head).await?;
                client
                    .stream
                    .write_all(&response.body[..response.body.len() / 2])
                    .await?;
                client.stream.flush().await?;
                if f == Fault::ResetMidResponse {
                    reset(client.stream);
                } else {
                    client.stream.shutdown().await?;
                }
                return Ok(());
            }
            Some(Fault::ResetMidResponse | Fault::TruncateResponse) => {
                // No body to cut: the answer is lost instead.
                shared.injected(Fault::ResetBeforeResponse);
                reset(client.stream);
                return Ok(());
            }
            _ => {
                client.stream.write_all(&response.head).await?;
                client.stream.write_all(&response.body).await?;
            }
        }
    }
}

/// Sends `request` upstream and reads the final answer (skipping `100 Continue`).
async fn exchange(up: &mut Reader, request: &Message) -> std::io::Result<Message> {
    up.stream.write_all(&request.head).await?;
    up.stream.write_all(&request.body).await?;
    let is_head = request.first_line().starts_with("HEAD ");
    loop {
        let head = up
            .head()
            .await?
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        let mut msg = Message {
            head,
            body: Vec::new(),
        };
        let status = msg.first_line();
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if (100..200).contains(&code) {
            continue;
        }
        if !is_head && code != 204 && code != 304 {
            let to_eof =
                msg.header("content-length").is_none() && msg.header("transfer-encoding").is_none();
            msg.body = up.body(&msg, to_eof).await?;
        }
        return Ok(msg);
    }
}
