//! A PostgreSQL store of its own for each test: a fresh schema in the database named by
//! `TIDINGS_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`), dropped with
//! everything in it when the test's store is dropped. Tests never skip when PostgreSQL is absent:
//! they fail, saying how to get it.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

use tidings_store::postgres::{PostgresOptions, PostgresStore};

/// The database tests connect to.
pub fn postgres_url() -> String {
    std::env::var("TIDINGS_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A fresh store in a schema of its own, dropped with the value.
pub struct TempPostgres {
    pub store: Option<PostgresStore>,
    pub schema: String,
}

impl TempPostgres {
    pub async fn open() -> Self {
        static OPENED: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let schema = format!(
            "tidings_test_{}_{}_{}",
            std::process::id(),
            nanos,
            OPENED.fetch_add(1, Ordering::Relaxed)
        );
        let store = Self::connect(&schema).await;
        Self {
            store: Some(store),
            schema,
        }
    }

    /// The key chain file of the store in `schema` (every connection to it shares the file, as
    /// nodes of one deployment hold copies of one chain).
    pub fn key_chain(schema: &str) -> std::path::PathBuf {
        std::env::temp_dir()
            .join("tidings-test-key-chains")
            .join(format!("{schema}.chain"))
    }

    pub async fn connect(schema: &str) -> PostgresStore {
        let options = PostgresOptions {
            max_connections: 4,
            schema: Some(schema.to_string()),
            key_chain: Self::key_chain(schema),
        };
        // Its sessions carry the schema's name, so that dropping it can end them first.
        let base = postgres_url();
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}application_name={schema}");
        match PostgresStore::connect(&url, options).await {
            Ok(store) => store,
            Err(e) => panic!(
                "PostgreSQL is needed for this test and is not reachable at {} ({e}); \
                 see README.md (Tests) for how to install it, or set TIDINGS_TEST_POSTGRES",
                postgres_url()
            ),
        }
    }

    pub fn store(&self) -> &PostgresStore {
        self.store.as_ref().expect("open")
    }

    /// Closes the store and connects again to what it stored.
    pub async fn reopen(&mut self) {
        drop(self.store.take());
        self.store = Some(Self::connect(&self.schema).await);
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        drop(self.store.take());
        let _ = std::fs::remove_file(Self::key_chain(&self.schema));
        let schema = self.schema.clone();
        // Dropped from inside a runtime too: a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                if let Ok((client, connection)) =
                    tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await
                {
                    tokio::spawn(connection);
                    // The store's sessions may still be open: their runtime is the one this
                    // drop holds up.
                    let _ = client
                        .execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                             WHERE application_name = $1 AND pid <> pg_backend_pid()",
                            &[&schema],
                        )
                        .await;
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}
