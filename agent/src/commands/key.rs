//! `pgpitr key`: the key slots of an encrypted repository (`repo::encryption`). `create` makes
//! the repository key of a new repository; `add` and `remove` rotate passphrases by writing or
//! deleting one slot, never touching data; `list` shows the slots and which one the configured
//! passphrase opens. Passphrases come from files or a terminal prompt, never from arguments.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{read_passphrase_file, Config, ConfigError};
use crate::crypto::slots::{KeySlot, Passphrase};
use crate::repo::encryption::{self, KeyError};

#[derive(clap::Args, Debug)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum KeyCommand {
    /// Create the key of a new, empty repository, wrapped by the passphrase in
    /// `encryption_passphrase_file` (asked for on a terminal, and written there, if the file
    /// does not exist yet). Everything archived into the repository afterwards is encrypted.
    Create,
    /// List the key slots: id, creation time, Argon2id cost, and which one the configured
    /// passphrase opens.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Add a passphrase: a new slot wrapping the repository key, opened with the configured
    /// passphrase. The new passphrase comes from --new-passphrase-file, else a terminal prompt.
    Add {
        /// A file holding the new passphrase (mode 0600 or 0640).
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Remove a passphrase's slot. Refused for the last slot and for the slot the configured
    /// passphrase opens (switch `encryption_passphrase_file` to the new passphrase first).
    Remove {
        /// The slot id, as `pgpitr key list` shows it.
        slot: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum KeyCommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{0}")]
    Input(String),
}

impl KeyCommandError {
    /// Bad arguments or configuration, rather than a failure of the repository.
    pub fn is_usage(&self) -> bool {
        match self {
            KeyCommandError::Config(e) => e.storage_error().is_none(),
            KeyCommandError::Input(_) => true,
            KeyCommandError::Key(e) => !matches!(e, KeyError::Storage(_)),
        }
    }
}

/// One slot, as `list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SlotInfo {
    pub id: String,
    pub created: jiff::Timestamp,
    pub kdf: String,
    /// Whether the configured passphrase opens this slot.
    pub configured: bool,
}

/// Runs one `pgpitr key` subcommand and returns what to print.
///
/// # Errors
/// [`KeyCommandError`]: no passphrase configured, a wrong one, an unencrypted or non-empty
/// repository for `create`, the last or the configured slot for `remove`, storage errors.
pub async fn run(config: &Config, args: &KeyArgs) -> Result<String, KeyCommandError> {
    match &args.command {
        KeyCommand::Create => {
            let slot = create(config).await?;
            Ok(format!(
                "created the key of encrypted repository {} (key slot {})\nkeep a copy of the passphrase away from this host: without it no backup can be restored\n",
                config.raw_storage().await?.location(),
                slot.id
            ))
        }
        KeyCommand::List { json } => {
            let slots = list(config).await?;
            if *json {
                return Ok(serde_json::to_string_pretty(&slots).expect("serialisable") + "\n");
            }
            let mut out = format!("{:<18} {:<22} {:<28} \n", "slot", "created", "kdf");
            for s in &slots {
                out += &format!(
                    "{:<18} {:<22} {:<28} {}\n",
                    s.id,
                    s.created.strftime("%Y-%m-%d %H:%M:%SZ"),
                    s.kdf,
                    if s.configured { "(configured)" } else { "" }
                );
            }
            Ok(out)
        }
        KeyCommand::Add {
            new_passphrase_file,
        } => {
            let new = match new_passphrase_file {
                Some(path) => read_passphrase_file(path)?,
                None => prompt_new()?,
            };
            let raw = config.raw_storage().await?;
            let unlocked = encryption::unlock(raw.as_ref(), &configured(config)?, None).await?;
            if unlocked
                .slots
                .iter()
                .any(|s| s.unlock(&new, None).ok().flatten().is_some())
            {
                return Err(KeyCommandError::Input(
                    "that passphrase already opens a key slot of this repository".into(),
                ));
            }
            let slot = encryption::add(raw.as_ref(), &unlocked, &new).await?;
            Ok(format!("added key slot {}\n", slot.id))
        }
        KeyCommand::Remove { slot } => {
            let raw = config.raw_storage().await?;
            let unlocked = encryption::unlock(raw.as_ref(), &configured(config)?, None).await?;
            encryption::remove(raw.as_ref(), &unlocked, slot).await?;
            Ok(format!("removed key slot {slot}\n"))
        }
    }
}

/// Creates the repository key (see [`KeyCommand::Create`]).
///
/// # Errors
/// As [`run`].
pub async fn create(config: &Config) -> Result<KeySlot, KeyCommandError> {
    let path = config.encryption_passphrase_file.as_deref().ok_or_else(|| {
        KeyCommandError::Input(
            "set `encryption_passphrase_file` (or PGPITR_ENCRYPTION_PASSPHRASE_FILE) to the file that will hold the passphrase".into(),
        )
    })?;
    let passphrase = if path.exists() {
        read_passphrase_file(path)?
    } else {
        let p = prompt_new()?;
        write_passphrase_file(path, &p)?;
        p
    };
    let raw = config.raw_storage().await?;
    Ok(encryption::create(raw.as_ref(), &passphrase).await?)
}

/// The slots, with which one the configured passphrase opens (none when it is unset).
///
/// # Errors
/// As [`run`].
pub async fn list(config: &Config) -> Result<Vec<SlotInfo>, KeyCommandError> {
    let raw = config.raw_storage().await?;
    let slots = encryption::load_slots(raw.as_ref()).await?;
    if slots.is_empty() {
        return Err(KeyError::NoKey {
            location: raw.location(),
        }
        .into());
    }
    let opened = match config.encryption_passphrase()? {
        Some(p) => Some(encryption::unlock(raw.as_ref(), &p, None).await?.slot.id),
        None => None,
    };
    Ok(slots
        .into_iter()
        .map(|s| SlotInfo {
            configured: opened.as_deref() == Some(s.id.as_str()),
            kdf: format!(
                "argon2id m={}MiB t={} p={}",
                s.kdf.memory_kib / 1024,
                s.kdf.iterations,
                s.kdf.parallelism
            ),
            created: s.created,
            id: s.id,
        })
        .collect())
}

fn configured(config: &Config) -> Result<Passphrase, KeyCommandError> {
    config.encryption_passphrase()?.ok_or_else(|| {
        KeyCommandError::Input(
            "set `encryption_passphrase_file` to a file holding a passphrase of this repository"
                .into(),
        )
    })
}

/// A new passphrase typed twice on the terminal.
fn prompt_new() -> Result<Passphrase, KeyCommandError> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(KeyCommandError::Input(
            "no terminal to ask for a passphrase: write it to a file (mode 0600) and name that file".into(),
        ));
    }
    let read = |prompt: &str| {
        rpassword::prompt_password(prompt)
            .map_err(|e| KeyCommandError::Input(format!("cannot read the passphrase: {e}")))
    };
    let first = zeroize::Zeroizing::new(read("new passphrase: ")?);
    let again = zeroize::Zeroizing::new(read("again: ")?);
    if *first != *again {
        return Err(KeyCommandError::Input("the two passphrases differ".into()));
    }
    Passphrase::new(first.as_bytes().to_vec()).map_err(KeyCommandError::Input)
}

/// Writes a typed passphrase to `path`, mode 0600, never over an existing file.
fn write_passphrase_file(path: &Path, p: &Passphrase) -> Result<(), KeyCommandError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| KeyCommandError::Input(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(p.expose())
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(|e| KeyCommandError::Input(format!("cannot write {}: {e}", path.display())))
}
