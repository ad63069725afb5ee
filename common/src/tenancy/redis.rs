//! Keys of a fleet, in Redis: `{prefix}apikey:{id}` holds a key as JSON (its hash, never its
//! secret), `{prefix}apikeys` the ids, `{prefix}tenant:{t}:limits` a tenant's limits. Every
//! gateway reads them (through its short-lived cache), so a revocation reaches all of them.

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::{ApiKey, KeyError, KeyStore, Limits};
use kiln_proto::UnixMillis;

pub struct RedisKeys {
    conn: ConnectionManager,
    prefix: String,
}

impl RedisKeys {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self { conn, prefix: prefix.to_owned() }
    }

    fn key(&self, id: &str) -> String {
        format!("{}apikey:{id}", self.prefix)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, KeyError> {
        cmd.query_async(&mut self.conn.clone()).await.map_err(|e| KeyError::Unavailable(e.to_string()))
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, KeyError> {
    serde_json::from_str(text).map_err(|e| KeyError::Corrupt(format!("{what}: {e}")))
}

#[async_trait]
impl KeyStore for RedisKeys {
    async fn put(&self, key: &ApiKey) -> Result<(), KeyError> {
        let text = serde_json::to_string(key).expect("keys serialise");
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.key(&key.id))
            .arg(text)
            .ignore()
            .cmd("ZADD")
            .arg(format!("{}apikeys", self.prefix))
            .arg(key.created_at)
            .arg(&key.id)
            .ignore();
        pipe.query_async::<()>(&mut self.conn.clone()).await.map_err(|e| KeyError::Unavailable(e.to_string()))
    }

    async fn get(&self, id: &str) -> Result<Option<ApiKey>, KeyError> {
        let text: Option<String> = self.query(redis::cmd("GET").arg(self.key(id))).await?;
        text.map(|t| decode(&format!("key {id}"), &t)).transpose()
    }

    async fn list(&self) -> Result<Vec<ApiKey>, KeyError> {
        let ids: Vec<String> =
            self.query(redis::cmd("ZRANGE").arg(format!("{}apikeys", self.prefix)).arg(0).arg(-1)).await?;
        let mut keys = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(k) = self.get(&id).await? {
                keys.push(k);
            }
        }
        Ok(keys)
    }

    async fn revoke(&self, id: &str, at: UnixMillis) -> Result<ApiKey, KeyError> {
        let mut key = self.get(id).await?.ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
        key.revoked_at.get_or_insert(at);
        self.put(&key).await?;
        Ok(key)
    }

    async fn tenant_limits(&self, tenant: &str) -> Result<Limits, KeyError> {
        let text: Option<String> =
            self.query(redis::cmd("GET").arg(format!("{}tenant:{tenant}:limits", self.prefix))).await?;
        Ok(text.map(|t| decode(&format!("limits of {tenant}"), &t)).transpose()?.unwrap_or_default())
    }

    async fn set_tenant_limits(&self, tenant: &str, limits: &Limits) -> Result<(), KeyError> {
        let text = serde_json::to_string(limits).expect("limits serialise");
        self.query(redis::cmd("SET").arg(format!("{}tenant:{tenant}:limits", self.prefix)).arg(text)).await
    }
}
