//! rupload byte storage: one append-only session per upload key, in memory or in files.
//!
//! Bodies are appended frame by frame as they arrive (never buffered whole), and a running
//! SHA-256 is kept per session. With [`StorageMode::Directory`] memory stays bounded whatever the
//! upload size; reading a whole upload back (`finish_upload` content checks, the admin download)
//! does load it into memory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::StorageMode;

/// Storage failures (file I/O in directory mode).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("upload storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// All upload sessions.
#[derive(Debug)]
pub struct Store {
    mode: StorageMode,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    handles: Mutex<HashMap<String, String>>,
}

/// One upload key.
#[derive(Debug)]
pub struct Session {
    pub key: String,
    backing: tokio::sync::Mutex<Backing>,
    info: Mutex<SessionInfo>,
}

#[derive(Debug)]
enum Backing {
    Memory(Vec<u8>),
    /// `append` keeps the file open between the chunks of one POST (opened on first use).
    File {
        path: PathBuf,
        append: Option<tokio::fs::File>,
    },
}

#[derive(Debug, Clone)]
struct SessionInfo {
    len: u64,
    hasher: Sha256,
    handle: Option<String>,
    /// User whose POST completed the upload and got the handle (the handle's owner).
    owner_id: Option<String>,
    entity_name: Option<String>,
    created_at_ms: i64,
    updated_at_ms: i64,
    posts: u64,
}

/// Read-back view of a session (admin API).
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    pub key: String,
    pub bytes_stored: u64,
    pub sha256: String,
    pub handle: Option<String>,
    pub completed: bool,
    /// User the handle was issued to (see [`Store::ensure_handle`]).
    pub owner_id: Option<String>,
    pub entity_name: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub posts: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated, so recover the data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    pub fn new(mode: StorageMode) -> Result<Self, StorageError> {
        if let StorageMode::Directory(dir) = &mode {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Self {
            mode,
            sessions: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
        })
    }

    /// The session for `key`, if any bytes or requests were seen for it.
    pub fn get(&self, key: &str) -> Option<Arc<Session>> {
        lock(&self.sessions).get(key).cloned()
    }

    /// The session for `key`, created empty when new.
    pub fn get_or_create(&self, key: &str, now_ms: i64) -> Arc<Session> {
        let mut map = lock(&self.sessions);
        if let Some(s) = map.get(key) {
            return s.clone();
        }
        let backing = match &self.mode {
            StorageMode::Memory => Backing::Memory(Vec::new()),
            StorageMode::Directory(dir) => Backing::File {
                path: dir.join(format!("{}.bin", hex::encode(Sha256::digest(key.as_bytes())))),
                append: None,
            },
        };
        let s = Arc::new(Session {
            key: key.to_string(),
            backing: tokio::sync::Mutex::new(backing),
            info: Mutex::new(SessionInfo {
                len: 0,
                hasher: Sha256::new(),
                handle: None,
                owner_id: None,
                entity_name: None,
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
                posts: 0,
            }),
        });
        map.insert(key.to_string(), s.clone());
        s
    }

    /// Upload key of a handle.
    pub fn key_for_handle(&self, handle: &str) -> Option<String> {
        lock(&self.handles).get(handle).cloned()
    }

    /// Give `session` its handle (once; later calls return the first one). The first call also binds the
    /// handle to `owner` (the user whose POST completed the upload), for
    /// [`crate::Settings::handles_bound_to_uploader`].
    pub fn ensure_handle(
        &self,
        session: &Session,
        owner: Option<&str>,
        make: impl FnOnce() -> String,
    ) -> String {
        let mut info = lock(&session.info);
        if let Some(h) = &info.handle {
            return h.clone();
        }
        let h = make();
        lock(&self.handles).insert(h.clone(), session.key.clone());
        info.handle = Some(h.clone());
        info.owner_id = owner.map(str::to_string);
        h
    }

    /// Views of every session, sorted by key.
    pub fn list(&self) -> Vec<SessionView> {
        let mut v: Vec<SessionView> = lock(&self.sessions).values().map(|s| s.view()).collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }
}

/// Exclusive write access to a session (one POST at a time per key).
pub struct SessionWriter<'a> {
    session: &'a Session,
    backing: tokio::sync::MutexGuard<'a, Backing>,
}

impl Session {
    /// Bytes stored so far.
    pub fn len(&self) -> u64 {
        lock(&self.info).len
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The handle, once a POST completed.
    pub fn handle(&self) -> Option<String> {
        lock(&self.info).handle.clone()
    }

    /// The user the handle was issued to.
    pub fn owner_id(&self) -> Option<String> {
        lock(&self.info).owner_id.clone()
    }

    /// Hex SHA-256 of the stored bytes.
    pub fn sha256_hex(&self) -> String {
        hex::encode(lock(&self.info).hasher.clone().finalize())
    }

    /// Admin view.
    pub fn view(&self) -> SessionView {
        let info = lock(&self.info).clone();
        SessionView {
            key: self.key.clone(),
            bytes_stored: info.len,
            sha256: hex::encode(info.hasher.finalize()),
            completed: info.handle.is_some(),
            handle: info.handle,
            owner_id: info.owner_id,
            entity_name: info.entity_name,
            created_at_ms: info.created_at_ms,
            updated_at_ms: info.updated_at_ms,
            posts: info.posts,
        }
    }

    /// Note a POST (its `X-Entity-Name` and time).
    pub fn note_post(&self, entity_name: Option<String>, now_ms: i64) {
        let mut info = lock(&self.info);
        info.posts += 1;
        info.updated_at_ms = now_ms;
        if entity_name.is_some() {
            info.entity_name = entity_name;
        }
    }

    /// Wait for exclusive write access.
    pub async fn writer(&self) -> SessionWriter<'_> {
        SessionWriter {
            session: self,
            backing: self.backing.lock().await,
        }
    }

    /// Every stored byte.
    pub async fn read_all(&self) -> Result<Vec<u8>, StorageError> {
        let backing = self.backing.lock().await;
        read_backing(&backing).await
    }

    /// The stored bytes for reading without copying a file-backed upload into memory (`finish_upload`
    /// reads a 2 GiB zip entry by entry).
    pub async fn content(&self) -> Result<StoredContent, StorageError> {
        let backing = self.backing.lock().await;
        match &*backing {
            Backing::Memory(v) => Ok(StoredContent::Memory(v.clone())),
            Backing::File { path, .. } => match tokio::fs::File::open(path).await {
                Ok(f) => Ok(StoredContent::File(f.into_std().await)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoredContent::Memory(Vec::new())),
                Err(e) => Err(e.into()),
            },
        }
    }
}

/// What [`Session::content`] gives: the bytes of an in-memory session, or the open file of a stored one.
#[derive(Debug)]
pub enum StoredContent {
    Memory(Vec<u8>),
    File(std::fs::File),
}

async fn read_backing(b: &Backing) -> Result<Vec<u8>, StorageError> {
    match b {
        Backing::Memory(v) => Ok(v.clone()),
        Backing::File { path, .. } => match tokio::fs::File::open(path).await {
            Ok(mut f) => {
                let mut out = Vec::new();
                f.read_to_end(&mut out).await?;
                Ok(out)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        },
    }
}

impl Drop for SessionWriter<'_> {
    /// The append handle lives for one writer (one POST): no descriptor stays open per session.
    fn drop(&mut self) {
        if let Backing::File { append, .. } = &mut *self.backing {
            *append = None;
        }
    }
}

impl SessionWriter<'_> {
    /// Append bytes and update length and hash.
    pub async fn append(&mut self, data: &[u8]) -> Result<(), StorageError> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut *self.backing {
            Backing::Memory(v) => v.extend_from_slice(data),
            Backing::File { path, append } => {
                let f = match append {
                    Some(f) => f,
                    None => append.insert(
                        tokio::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&*path)
                            .await?,
                    ),
                };
                f.write_all(data).await?;
                f.flush().await?;
            }
        }
        let mut info = lock(&self.session.info);
        info.len += data.len() as u64;
        info.hasher.update(data);
        Ok(())
    }

    /// Cut the stored bytes back to `len` (the discard-on-drop policy) and recompute the hash.
    pub async fn truncate(&mut self, len: u64) -> Result<(), StorageError> {
        match &mut *self.backing {
            Backing::Memory(v) => v.truncate(usize::try_from(len).unwrap_or(usize::MAX)),
            Backing::File { path, append } => {
                *append = None;
                if let Ok(f) = tokio::fs::OpenOptions::new().write(true).open(&*path).await {
                    f.set_len(len).await?;
                }
            }
        }
        let bytes = read_backing(&self.backing).await?;
        let mut info = lock(&self.session.info);
        info.len = bytes.len() as u64;
        info.hasher = Sha256::new();
        info.hasher.update(&bytes);
        Ok(())
    }
}
