//! [`RedisStore`]: the store in a Redis server, shared by the coordinators of a cluster.
//!
//! Layout, under a key prefix (`stylefarm` unless given another):
//!
//! - `{prefix}:jobs`: a sorted set of job ids scored by their submission sequence (the order of
//!   [`Store::load`]);
//! - `{prefix}:job:{id}`: the job's record ([`JobMeta`]) as JSON;
//! - `{prefix}:tasks:{id}`: a hash of the job's tasks ([`TaskRecord`] as JSON) by their index.
//!
//! A writer thread applies the queued writes in order on one connection; the writes queued while it was busy
//! go to the server together as one `MULTI`/`EXEC` transaction (group commit), which Redis applies
//! atomically. A write is durable when the server has acknowledged its transaction: as durable as the
//! server's persistence makes it (with `appendonly yes` and `appendfsync always` nothing acknowledged is
//! lost; `everysec` may lose the last second on a power failure, not on a crash of the server process).
//! When the server cannot be reached, the writes of that transaction fail with the connection's error and
//! the next one connects again.

use std::sync::mpsc;
use std::time::Duration;

use serde::Serialize;

use super::{durable_now, err, Durable, Op, Store, StoreError};
use crate::model::{JobMeta, TaskRecord};

/// How long connecting to the server, and each reply, may take before the call fails.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "stylefarm";

/// A job's tasks as `HGETALL` returns them: (index, JSON) pairs.
type TaskFields = Vec<(u32, Vec<u8>)>;

/// One queued write and where its outcome goes.
struct Write {
    ops: Vec<Op>,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// The store in a Redis server (`redis://[user:password@]host:port[/db]`).
pub struct RedisStore {
    client: redis::Client,
    prefix: String,
    writes: Option<mpsc::Sender<Write>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// The keys of one store.
#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn jobs(&self) -> String {
        format!("{}:jobs", self.prefix)
    }

    fn job(&self, id: &str) -> String {
        format!("{}:job:{id}", self.prefix)
    }

    fn tasks(&self, id: &str) -> String {
        format!("{}:tasks:{id}", self.prefix)
    }
}

fn json(value: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(err)
}

fn connect(client: &redis::Client) -> Result<redis::Connection, StoreError> {
    let con = client
        .get_connection_with_timeout(TIMEOUT)
        .map_err(|e| err(format!("redis: {e}")))?;
    con.set_read_timeout(Some(TIMEOUT)).map_err(err)?;
    con.set_write_timeout(Some(TIMEOUT)).map_err(err)?;
    Ok(con)
}

/// The commands of `ops`, appended to `pipe`.
fn queue(pipe: &mut redis::Pipeline, keys: &Keys, ops: &[Op]) -> Result<(), StoreError> {
    let task = |pipe: &mut redis::Pipeline, id: &str, t: &TaskRecord| -> Result<(), StoreError> {
        pipe.cmd("HSET")
            .arg(keys.tasks(id))
            .arg(t.index)
            .arg(json(t)?)
            .ignore();
        Ok(())
    };
    for op in ops {
        match op {
            Op::Insert(job, tasks) => {
                let id = job.id.as_str();
                pipe.cmd("SET").arg(keys.job(id)).arg(json(job)?).ignore();
                pipe.cmd("ZADD")
                    .arg(keys.jobs())
                    .arg(job.seq)
                    .arg(id)
                    .ignore();
                for t in tasks {
                    task(pipe, id, t)?;
                }
            }
            Op::Job(job) => {
                pipe.cmd("SET")
                    .arg(keys.job(job.id.as_str()))
                    .arg(json(job)?)
                    .ignore();
            }
            Op::Task(job_id, t) => task(pipe, job_id.as_str(), t)?,
        }
    }
    Ok(())
}

impl RedisStore {
    /// Connects to the server at `url` (checking that it answers) and starts the writer thread; the keys
    /// start with `prefix` (several farms can share a server under different prefixes).
    pub fn open(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        let client =
            redis::Client::open(url).map_err(|e| err(format!("redis url '{url}': {e}")))?;
        let mut con = connect(&client)?;
        redis::cmd("PING")
            .query::<String>(&mut con)
            .map_err(|e| err(format!("redis: {e}")))?;
        let keys = Keys {
            prefix: prefix.to_string(),
        };
        let (writes, inbox) = mpsc::channel::<Write>();
        let writer = {
            let client = client.clone();
            std::thread::Builder::new()
                .name("store-redis".into())
                .spawn(move || Self::write_loop(&client, &keys, con, &inbox))
                .map_err(err)?
        };
        Ok(RedisStore {
            client,
            prefix: prefix.to_string(),
            writes: Some(writes),
            writer: Some(writer),
        })
    }

    fn write_loop(
        client: &redis::Client,
        keys: &Keys,
        con: redis::Connection,
        inbox: &mpsc::Receiver<Write>,
    ) {
        let mut con = Some(con);
        while let Ok(first) = inbox.recv() {
            // every write queued meanwhile joins this transaction
            let mut batch = vec![first];
            batch.extend(inbox.try_iter());
            let mut pipe = redis::pipe();
            pipe.atomic();
            let queued: Result<(), StoreError> = batch
                .iter()
                .try_for_each(|w| queue(&mut pipe, keys, &w.ops));
            let result = queued.and_then(|()| {
                let c = match con.as_mut() {
                    Some(c) => c,
                    None => con.insert(connect(client)?),
                };
                pipe.exec(c).map_err(|e| err(format!("redis: {e}")))
            });
            if let Err(e) = &result {
                tracing::error!(error = %e, "store write failed");
                // a broken connection is replaced on the next write
                con = None;
            }
            for w in batch {
                let _ = w.done.send(
                    result
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| StoreError(e.0.clone())),
                );
            }
        }
    }
}

impl Store for RedisStore {
    fn write(&self, ops: Vec<Op>) -> Durable {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let sent = self
            .writes
            .as_ref()
            .ok_or_else(|| err("the store is closed"))
            .and_then(|w| {
                w.send(Write { ops, done })
                    .map_err(|_| err("the store's writer stopped"))
            });
        if let Err(e) = sent {
            return durable_now(Err(e));
        }
        Box::pin(async move {
            outcome
                .await
                .unwrap_or_else(|_| Err(err("the store's writer stopped")))
        })
    }

    fn load(&self) -> Result<Vec<(JobMeta, Vec<TaskRecord>)>, StoreError> {
        let keys = Keys {
            prefix: self.prefix.clone(),
        };
        let redis = |e: redis::RedisError| err(format!("redis: {e}"));
        let mut con = connect(&self.client)?;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys.jobs())
            .arg(0)
            .arg(-1)
            .query(&mut con)
            .map_err(redis)?;
        let mut all = Vec::with_capacity(ids.len());
        for id in ids {
            let (meta, tasks): (Option<Vec<u8>>, TaskFields) = redis::pipe()
                .cmd("GET")
                .arg(keys.job(&id))
                .cmd("HGETALL")
                .arg(keys.tasks(&id))
                .query(&mut con)
                .map_err(redis)?;
            let meta = meta.ok_or_else(|| err(format!("job {id} is listed but has no record")))?;
            let meta: JobMeta =
                crate::model::job_from_json(&meta).map_err(|e| err(format!("job {id}: {e}")))?;
            let mut tasks = tasks
                .into_iter()
                .map(|(index, t)| {
                    crate::model::task_from_json(&t)
                        .map_err(|e| err(format!("job {id} task {index}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            tasks.sort_by_key(|t| t.index);
            all.push((meta, tasks));
        }
        Ok(all)
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // the writer drains what is queued, then ends
        self.writes = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// A redis-server of its own, for tests and benchmarks: on a loopback port, its files in a temporary
/// directory, persistence off; killed when dropped. Panics with the reason when `redis-server` cannot
/// start (the README's test command installs it).
pub struct RedisServer {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// A server on a free port.
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        Self::start_on(port)
    }

    /// A server on `port` (e.g. again on the port of one that was stopped).
    pub fn start_on(port: u16) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (installed by deploy/test.sh: apt-get install redis-server)");
        let server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        let client = redis::Client::open(server.url()).unwrap();
        for _ in 0..100 {
            if let Ok(mut con) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut con).is_ok() {
                    return server;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not answer on port {port}");
    }

    /// Its URL, `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_store() {
        let server = RedisServer::start();
        super::super::tests::suite(&RedisStore::open(&server.url(), "test").unwrap());
        // another prefix on the same server is another store
        assert!(RedisStore::open(&server.url(), "other")
            .unwrap()
            .load()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn writes_apply_in_order_and_survive_a_new_store_on_the_same_server() {
        let server = RedisServer::start();
        let store = RedisStore::open(&server.url(), DEFAULT_PREFIX).unwrap();
        let (mut job, tasks) = super::super::tests::job("job-1", 1);
        let inserted = store.write(vec![Op::Insert(job.clone(), tasks.clone())]);
        // queued before the first resolved: applied after it, maybe in the same transaction
        let mut pending = Vec::new();
        for n in 0..50 {
            job.strikes.insert("w".into(), n);
            pending.push(store.write(vec![Op::Job(job.clone())]));
        }
        super::super::wait(inserted).unwrap();
        for p in pending {
            super::super::wait(p).unwrap();
        }
        drop(store);
        let again = RedisStore::open(&server.url(), DEFAULT_PREFIX).unwrap();
        assert_eq!(again.load().unwrap(), vec![(job, tasks)]);
    }

    #[test]
    fn an_unreachable_server_fails_the_write_and_the_next_one_reconnects() {
        let server = RedisServer::start();
        let url = server.url();
        let store = RedisStore::open(&url, DEFAULT_PREFIX).unwrap();
        let (job, tasks) = super::super::tests::job("job-1", 1);
        drop(server);
        let write = || store.write(vec![Op::Insert(job.clone(), tasks.clone())]);
        let err = super::super::wait(write()).unwrap_err();
        assert!(err.to_string().contains("redis"), "{err}");
        assert!(RedisStore::open(&url, DEFAULT_PREFIX).is_err());
        // a server back on that address: the next write connects again
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        let _back = RedisServer::start_on(port);
        super::super::wait(write()).unwrap();
        assert_eq!(store.load().unwrap(), vec![(job, tasks)]);
    }
}
