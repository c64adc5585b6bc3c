//! Where the database comes from: `--database-url`/`DATABASE_URL`, or a private
//! throwaway cluster for commands that may start one (the demo).

use anyhow::{Context, Result};
use ledger_core::db;
use ledger_testdb::{Durability, TempCluster};

/// A database to work in, and the cluster behind it when we started one ourselves.
pub struct Database {
    pub url: String,
    cluster: Option<TempCluster>,
}

impl Database {
    /// Uses `url` if given; otherwise starts a throwaway cluster (durable settings, so
    /// timings mean something) and creates database `dbname` in it.
    pub fn given_or_throwaway(url: Option<String>, dbname: &str) -> Result<Database> {
        Database::given_or_throwaway_with(url, dbname, &[])
    }

    /// Like `given_or_throwaway`, with extra settings for a throwaway cluster.
    pub fn given_or_throwaway_with(url: Option<String>, dbname: &str, settings: &[&str]) -> Result<Database> {
        if let Some(url) = url.filter(|u| !u.is_empty()) {
            return Ok(Database { url, cluster: None });
        }
        eprintln!("no DATABASE_URL given: starting a throwaway PostgreSQL cluster (removed on exit)");
        let cluster = TempCluster::start_with(Durability::Durable, settings)
            .context("starting a throwaway PostgreSQL cluster")?;
        let mut admin = db::connect(&cluster.url("postgres"), &db::SessionConfig::default())?;
        diesel::RunQueryDsl::execute(diesel::sql_query(format!("CREATE DATABASE {dbname}")), &mut admin)
            .with_context(|| format!("creating database {dbname}"))?;
        let url = cluster.url(dbname);
        Ok(Database { url, cluster: Some(cluster) })
    }

    pub fn is_throwaway(&self) -> bool {
        self.cluster.is_some()
    }

    /// Creates another database on the same throwaway server (the demo's scratch space).
    pub fn create_sibling(&self, dbname: &str) -> Result<String> {
        let mut admin = db::connect(&self.url, &db::SessionConfig::default())?;
        diesel::RunQueryDsl::execute(diesel::sql_query(format!("CREATE DATABASE {dbname}")), &mut admin)
            .with_context(|| format!("creating database {dbname}"))?;
        Ok(db::with_database(&self.url, dbname))
    }

    pub fn drop_sibling(&self, dbname: &str) -> Result<()> {
        let mut admin = db::connect(&self.url, &db::SessionConfig::default())?;
        diesel::RunQueryDsl::execute(
            diesel::sql_query(format!("DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")),
            &mut admin,
        )
        .with_context(|| format!("dropping database {dbname}"))?;
        Ok(())
    }

    /// Stops the throwaway cluster, if we started one.
    pub fn shutdown(self) -> Result<()> {
        if let Some(cluster) = self.cluster {
            cluster.stop().context("stopping the throwaway cluster")?;
        }
        Ok(())
    }
}
