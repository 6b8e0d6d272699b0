//! The async client's way to its server across the server's deaths: as
//! the blocking client's (`link.rs`, which says why), with an async
//! connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::connection::AsyncConnection;
use crate::link::{gone, nobody_listens, DEFAULT_WAIT, RETRY};
use crate::Error;

#[derive(Debug)]
pub(crate) struct AsyncLink {
    path: PathBuf,
    name: String,
    current: ::tokio::sync::Mutex<Arc<AsyncConnection>>,
    wait: Mutex<Duration>,
}

impl AsyncLink {
    pub(crate) async fn open(path: &Path, name: &str) -> Result<AsyncLink, Error> {
        let connection = AsyncConnection::open(path, name).await?;
        Ok(AsyncLink {
            path: path.to_owned(),
            name: name.to_owned(),
            current: ::tokio::sync::Mutex::new(Arc::new(connection)),
            wait: Mutex::new(DEFAULT_WAIT),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// What the server of the connection in use said about itself.
    pub(crate) async fn info(&self) -> crate::ServerInfo {
        self.current.lock().await.info().clone()
    }

    pub(crate) fn set_wait(&self, wait: Duration) {
        *self.wait.lock().unwrap_or_else(|p| p.into_inner()) = wait;
    }

    /// The connection to use now: the current one if its server is still
    /// there, else a new one.
    pub(crate) async fn connection(&self) -> Result<Arc<AsyncConnection>, Error> {
        let mut current = self.current.lock().await;
        if current.is_alive() {
            return Ok(current.clone());
        }
        self.replace(&mut current).await
    }

    /// A new connection in place of `dead`, whose send found it closed
    /// (unless another task replaced it already).
    pub(crate) async fn instead_of(
        &self,
        dead: &Arc<AsyncConnection>,
    ) -> Result<Arc<AsyncConnection>, Error> {
        let mut current = self.current.lock().await;
        if !Arc::ptr_eq(&current, dead) {
            return Ok(current.clone());
        }
        self.replace(&mut current).await
    }

    async fn replace(
        &self,
        current: &mut Arc<AsyncConnection>,
    ) -> Result<Arc<AsyncConnection>, Error> {
        let wait = *self.wait.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + wait;
        loop {
            match AsyncConnection::open(&self.path, &self.name).await {
                Ok(connection) => {
                    *current = Arc::new(connection);
                    return Ok(current.clone());
                }
                Err(e) if nobody_listens(&e) && Instant::now() < deadline => {
                    ::tokio::time::sleep(RETRY).await;
                }
                Err(e) => return Err(gone(e, wait)),
            }
        }
    }
}
