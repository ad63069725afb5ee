//! Keys of the embedded backend: a JSON file (`KILN_KEYS_FILE`) that `kiln keys` writes and a
//! running `kiln dev` re-reads when it changes (looked at no more than every 250 ms, so a
//! revocation takes effect within a second), or memory alone when no file is given.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{ApiKey, KeyError, KeyStore, Limits};
use kiln_proto::UnixMillis;

/// How stale the in-memory copy of the file may be.
const RECHECK: Duration = Duration::from_millis(250);

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Contents {
    #[serde(default)]
    keys: BTreeMap<String, ApiKey>,
    #[serde(default)]
    tenants: BTreeMap<String, Limits>,
}

struct Loaded {
    contents: Contents,
    modified: Option<SystemTime>,
    checked: Option<Instant>,
}

pub struct FileKeys {
    path: Option<PathBuf>,
    state: Mutex<Loaded>,
}

impl FileKeys {
    /// Keys kept in `path` (created on the first write), or in memory only.
    pub fn new(path: Option<PathBuf>) -> Self {
        Self { path, state: Mutex::new(Loaded { contents: Contents::default(), modified: None, checked: None }) }
    }

    /// The current contents, re-read when the file changed since it was last read.
    fn fresh(&self) -> Result<std::sync::MutexGuard<'_, Loaded>, KeyError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = &self.path else { return Ok(state) };
        if state.checked.is_some_and(|c| c.elapsed() < RECHECK) {
            return Ok(state);
        }
        state.checked = Some(Instant::now());
        let modified = match std::fs::metadata(path) {
            Ok(m) => m.modified().ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                state.contents = Contents::default();
                state.modified = None;
                return Ok(state);
            }
            Err(e) => return Err(KeyError::Unavailable(format!("{}: {e}", path.display()))),
        };
        if modified.is_none() || modified != state.modified {
            let text =
                std::fs::read_to_string(path).map_err(|e| KeyError::Unavailable(format!("{}: {e}", path.display())))?;
            state.contents =
                serde_json::from_str(&text).map_err(|e| KeyError::Corrupt(format!("{}: {e}", path.display())))?;
            state.modified = modified;
        }
        Ok(state)
    }

    /// Applies `change` to the freshest contents and writes them back (whole, by rename).
    fn update<T>(&self, change: impl FnOnce(&mut Contents) -> Result<T, KeyError>) -> Result<T, KeyError> {
        let mut state = self.fresh()?;
        let mut next = state.contents.clone();
        let out = change(&mut next)?;
        if let Some(path) = &self.path {
            let text = serde_json::to_string_pretty(&next).expect("keys serialise");
            let tmp = path.with_extension("tmp");
            let write = || -> std::io::Result<()> {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&tmp, text)?;
                std::fs::rename(&tmp, path)
            };
            write().map_err(|e| KeyError::Unavailable(format!("{}: {e}", path.display())))?;
            state.modified = std::fs::metadata(path).ok().and_then(|m| m.modified().ok());
        }
        state.contents = next;
        Ok(out)
    }
}

#[async_trait]
impl KeyStore for FileKeys {
    async fn put(&self, key: &ApiKey) -> Result<(), KeyError> {
        self.update(|c| {
            c.keys.insert(key.id.clone(), key.clone());
            Ok(())
        })
    }

    async fn get(&self, id: &str) -> Result<Option<ApiKey>, KeyError> {
        Ok(self.fresh()?.contents.keys.get(id).cloned())
    }

    async fn list(&self) -> Result<Vec<ApiKey>, KeyError> {
        let mut keys: Vec<ApiKey> = self.fresh()?.contents.keys.values().cloned().collect();
        keys.sort_by_key(|k| k.created_at);
        Ok(keys)
    }

    async fn revoke(&self, id: &str, at: UnixMillis) -> Result<ApiKey, KeyError> {
        self.update(|c| {
            let key = c.keys.get_mut(id).ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
            key.revoked_at.get_or_insert(at);
            Ok(key.clone())
        })
    }

    async fn tenant_limits(&self, tenant: &str) -> Result<Limits, KeyError> {
        Ok(self.fresh()?.contents.tenants.get(tenant).copied().unwrap_or_default())
    }

    async fn set_tenant_limits(&self, tenant: &str, limits: &Limits) -> Result<(), KeyError> {
        self.update(|c| {
            c.tenants.insert(tenant.to_owned(), *limits);
            Ok(())
        })
    }
}
