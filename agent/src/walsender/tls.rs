//! TLS for the replication connection: SSLRequest negotiation and rustls configuration per
//! `sslmode`.
//!
//! The client sends SSLRequest (protocol docs, "SSL Session Encryption"); the server answers
//! one byte, `S` (go ahead with the TLS handshake) or `N` (no TLS). Certificate checks follow
//! libpq (docs, "SSL Support"):
//!
//! | verification | used for                                                    |
//! |--------------|-------------------------------------------------------------|
//! | none         | allow / prefer / require, when no root certificate file exists |
//! | chain        | verify-ca, and allow / prefer / require when one exists     |
//! | chain + name | verify-full                                                 |
//!
//! The root certificate file is `sslrootcert`, else `~/.postgresql/root.crt`; the value
//! `system` uses the operating system's trust store (rustls-native-certs). Even without
//! verification, the handshake signatures are checked, so the session is bound to the
//! certificate presented.

use std::path::PathBuf;
use std::sync::Arc;

use postgres_protocol::message::frontend;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::conninfo::{home_dir, ConnectParams, SslMode};
use super::error::WalsenderError;

/// How much of the server certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Nothing but the handshake signatures.
    None,
    /// The chain up to a trusted root, not the host name.
    Chain,
    /// The chain and the host name.
    Full,
}

/// Where trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    File(PathBuf),
    System,
}

/// Resolves the root certificate source like libpq: explicit `sslrootcert` (or `system`),
/// else `~/.postgresql/root.crt`. Returns `None` when the file does not exist.
fn find_roots(params: &ConnectParams) -> Option<Roots> {
    match &params.sslrootcert {
        Some(p) if p.as_os_str() == "system" => Some(Roots::System),
        Some(p) => p.exists().then(|| Roots::File(p.clone())),
        None => home_dir()
            .map(|h| h.join(".postgresql").join("root.crt"))
            .filter(|p| p.exists())
            .map(Roots::File),
    }
}

/// The verification level for `params.sslmode` (see the module docs).
pub(crate) fn verify_level(params: &ConnectParams) -> Verify {
    match params.sslmode {
        SslMode::VerifyFull => Verify::Full,
        SslMode::VerifyCa => Verify::Chain,
        _ if find_roots(params).is_some() => Verify::Chain,
        _ => Verify::None,
    }
}

/// Sends SSLRequest and reads the answer: `Ok(true)` if the server agreed to TLS.
pub(crate) async fn request_tls(tcp: &mut TcpStream) -> Result<bool, WalsenderError> {
    let mut buf = bytes::BytesMut::with_capacity(8);
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await.map_err(WalsenderError::Io)?;
    // Read exactly one byte: anything the server sends after 'S' must come through TLS
    // (CVE-2021-23222), so nothing may be buffered here.
    let answer = tcp.read_u8().await.map_err(WalsenderError::Io)?;
    match answer {
        b'S' => Ok(true),
        b'N' => Ok(false),
        b'E' => Err(WalsenderError::Protocol(
            "server sent an error in response to SSLRequest (server too old?)".to_owned(),
        )),
        other => Err(WalsenderError::Protocol(format!(
            "unexpected response to SSLRequest: {:?}",
            char::from(other)
        ))),
    }
}

/// Runs the TLS handshake on a stream whose SSLRequest the server accepted.
pub(crate) async fn handshake(
    tcp: TcpStream,
    params: &ConnectParams,
    verify: Verify,
) -> Result<TlsStream<TcpStream>, WalsenderError> {
    let config = client_config(params, verify)?;
    let server_name = match ServerName::try_from(params.host.clone()) {
        Ok(name) => name,
        Err(_) if verify != Verify::Full => ServerName::try_from("localhost").expect("valid name"),
        Err(e) => {
            return Err(WalsenderError::Tls(format!(
                "host \"{}\" is not a valid name for certificate verification: {e}",
                params.host
            )))
        }
    };
    TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| WalsenderError::Tls(format!("handshake with {} failed: {e}", params.target())))
}

fn crypto_provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

fn client_config(
    params: &ConnectParams,
    verify: Verify,
) -> Result<Arc<rustls::ClientConfig>, WalsenderError> {
    let provider = crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| WalsenderError::Tls(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::None => Arc::new(NoVerification(provider)),
        Verify::Chain | Verify::Full => {
            let roots = match find_roots(params) {
                Some(r) => r,
                None => {
                    let path = params.sslrootcert.clone().unwrap_or_else(|| {
                        home_dir()
                            .unwrap_or_default()
                            .join(".postgresql")
                            .join("root.crt")
                    });
                    return Err(WalsenderError::Tls(format!(
                        "root certificate file {:?} does not exist; either provide the file \
                         (sslrootcert) or change sslmode to disable server certificate \
                         verification",
                        path.display()
                    )));
                }
            };
            let store = Arc::new(load_roots(&roots)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(store, provider)
                .build()
                .map_err(|e| WalsenderError::Tls(format!("cannot build verifier: {e}")))?;
            if verify == Verify::Full {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // PostgreSQL 17+ checks the ALPN protocol if one is offered; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(config))
}

fn load_roots(roots: &Roots) -> Result<RootCertStore, WalsenderError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            if let Some(e) = found.errors.first() {
                tracing::warn!("while loading system root certificates: {e}");
            }
            store.add_parsable_certificates(found.certs);
        }
        Roots::File(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                WalsenderError::Tls(format!(
                    "could not read root certificate file {:?}: {e}",
                    path.display()
                ))
            })?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    WalsenderError::Tls(format!(
                        "could not parse root certificate file {:?}: {e}",
                        path.display()
                    ))
                })?;
            store.add_parsable_certificates(certs);
        }
    }
    if store.is_empty() {
        return Err(WalsenderError::Tls(match roots {
            Roots::System => "no usable system root certificates found".to_owned(),
            Roots::File(p) => format!("no certificates found in {:?}", p.display().to_string()),
        }));
    }
    Ok(store)
}

/// sslmode=require without a root file: accept any certificate, check handshake signatures.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// sslmode=verify-ca: the full WebPKI check except the host name. The WebPKI verifier checks
/// the chain before the name, so a name mismatch means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
