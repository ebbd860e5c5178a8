//! The authentication exchange after the startup message.
//!
//! Supported server requests (protocol docs, "Start-up" and "SASL Authentication"):
//! AuthenticationOk (trust), AuthenticationCleartextPassword, AuthenticationMD5Password and
//! AuthenticationSASL with `SCRAM-SHA-256` (RFC 7677, via
//! `postgres_protocol::authentication::sasl`). Channel binding (`SCRAM-SHA-256-PLUS`) is not
//! offered: the client sends the `n,,` GS2 header, which servers accept whenever they also
//! list plain `SCRAM-SHA-256`. GSSAPI, SSPI, Kerberos and SCM credentials are refused.

use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::conninfo::ConnectParams;
use super::error::{classify_server_error, WalsenderError};
use super::wire::{self, Wire};

/// Answers authentication requests until AuthenticationOk.
///
/// # Errors
///
/// [`WalsenderError::PasswordRequired`] when the server wants a password and none is set,
/// [`WalsenderError::UnsupportedAuth`] for other methods, the classified server error
/// (usually [`WalsenderError::AuthFailed`]) when the server rejects the login.
pub(crate) async fn authenticate(
    wire: &mut Wire,
    params: &ConnectParams,
) -> Result<(), WalsenderError> {
    let mut scram: Option<ScramSha256> = None;
    loop {
        match wire.read_message().await? {
            Message::AuthenticationOk => {
                if scram.is_some() {
                    // SASLFinal must come before Ok; a server skipping it was not verified.
                    return Err(WalsenderError::Protocol(
                        "server ended SCRAM authentication without proving it knows the \
                         password"
                            .to_owned(),
                    ));
                }
                return Ok(());
            }
            Message::AuthenticationCleartextPassword => {
                let password = password(params)?;
                frontend::password_message(password.as_bytes(), &mut wire.wbuf)
                    .map_err(encode_error)?;
                wire.flush().await?;
            }
            Message::AuthenticationMd5Password(body) => {
                let password = password(params)?;
                let hash = md5_hash(params.user.as_bytes(), password.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut wire.wbuf)
                    .map_err(encode_error)?;
                wire.flush().await?;
            }
            Message::AuthenticationSasl(body) => {
                let mechanisms: Vec<String> = body
                    .mechanisms()
                    .map(|m| Ok(m.to_owned()))
                    .collect()
                    .map_err(|e| {
                        WalsenderError::Protocol(format!("bad SASL mechanism list: {e}"))
                    })?;
                if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                    return Err(WalsenderError::UnsupportedAuth(format!(
                        "SASL mechanisms {}",
                        mechanisms.join(", ")
                    )));
                }
                let password = password(params)?;
                let state = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, state.message(), &mut wire.wbuf)
                    .map_err(encode_error)?;
                wire.flush().await?;
                scram = Some(state);
            }
            Message::AuthenticationSaslContinue(body) => {
                let state = scram.as_mut().ok_or_else(|| unexpected("SASLContinue"))?;
                state
                    .update(body.data())
                    .map_err(|e| WalsenderError::Protocol(format!("SCRAM exchange failed: {e}")))?;
                frontend::sasl_response(state.message(), &mut wire.wbuf).map_err(encode_error)?;
                wire.flush().await?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let mut state = scram.take().ok_or_else(|| unexpected("SASLFinal"))?;
                state.finish(body.data()).map_err(|e| {
                    WalsenderError::Protocol(format!("SCRAM server signature is invalid: {e}"))
                })?;
            }
            Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => {
                return Err(WalsenderError::UnsupportedAuth("GSSAPI".to_owned()))
            }
            Message::AuthenticationSspi => {
                return Err(WalsenderError::UnsupportedAuth("SSPI".to_owned()))
            }
            Message::AuthenticationKerberosV5 => {
                return Err(WalsenderError::UnsupportedAuth("Kerberos V5".to_owned()))
            }
            Message::AuthenticationScmCredential => {
                return Err(WalsenderError::UnsupportedAuth(
                    "SCM credentials".to_owned(),
                ))
            }
            Message::ErrorResponse(body) => {
                let msg = wire::server_message(body.fields())?;
                return Err(classify_server_error(msg, &params.user, true));
            }
            Message::NoticeResponse(body) => {
                wire::log_notice(&wire::server_message(body.fields())?)
            }
            _ => return Err(unexpected("a non-authentication message")),
        }
    }
}

fn password(params: &ConnectParams) -> Result<&str, WalsenderError> {
    params
        .password
        .as_deref()
        .ok_or_else(|| WalsenderError::PasswordRequired {
            user: params.user.clone(),
        })
}

fn unexpected(what: &str) -> WalsenderError {
    WalsenderError::Protocol(format!("unexpected {what} during authentication"))
}

fn encode_error(e: std::io::Error) -> WalsenderError {
    WalsenderError::InvalidArgument(format!("cannot encode authentication message: {e}"))
}
