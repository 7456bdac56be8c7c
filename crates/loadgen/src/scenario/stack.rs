//! The stack a scenario runs against: its own (a database, a Redis, a Kafka broker and every
//! binary, two instances of the scheduler, the compensation worker and the event relay, on
//! free ports), or one `scripts/dev-up.sh` started (found by its pid files). Either way every
//! process is a [`Member`] that can be killed with `SIGKILL` and started again exactly as it
//! was (its argv and environment, read from `/proc` for a stack it did not start).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use service_kit::auth::{DEV_JWT_SECRET, DEV_STAFF_JWT_SECRET};

/// A process of the stack.
pub struct Member {
    /// `scheduler-2`, `redis`, ...
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Its HTTP base URL (`/readyz` answers when it is up); `None` for Redis and Kafka.
    pub url: Option<String>,
    /// A TCP port that accepts connections once it is up (Redis, Kafka).
    pub port: Option<u16>,
    pub pid: Option<u32>,
    /// Where its pid is kept (rewritten after a restart).
    pub pid_file: Option<PathBuf>,
    pub log: PathBuf,
    child: Option<std::process::Child>,
}

impl Member {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("log {}", self.log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // in the terminal's process group: a Ctrl-C stops the stack with the scenario (its
        // database stays, and scripts/test.sh drops leftovers)
        let child = cmd
            .spawn()
            .with_context(|| format!("start {} ({})", self.name, self.argv[0]))?;
        self.pid = Some(child.id());
        self.child = Some(child);
        Ok(())
    }

    /// `SIGKILL`, and waits until the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        } else if let Some(pid) = self.pid {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let start = Instant::now();
            while Path::new(&format!("/proc/{pid}")).exists()
                && start.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.pid = None;
    }

    async fn wait_up(&mut self, http: &reqwest::Client, within: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let up = match (&self.url, self.port) {
                (Some(url), _) => http
                    .get(format!("{url}/readyz"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
                (None, Some(port)) => tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok(),
                (None, None) => true,
            };
            if up {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "{} exited ({status}); its log: {}",
                        self.name,
                        self.log.display()
                    );
                }
            }
            if start.elapsed() > within {
                bail!(
                    "{} not ready after {within:?}; its log: {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts it again as it was started, and waits until it is up.
    pub async fn restart(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_up(http, Duration::from_secs(60)).await
    }
}

pub struct Stack {
    pub members: Vec<Member>,
    pub order_api: String,
    pub prelock: String,
    pub gateway: String,
    pub kafka_brokers: String,
    pub topic: String,
    pub redis_url: String,
    pub redis_prefix: String,
    /// The services' connection (the application role).
    pub database_url: String,
    /// A superuser's connection to the same database: the checker's reads and the
    /// connection-terminating fault.
    pub admin_database_url: String,
    /// The database this run made (dropped at the end unless kept); `None` when attached.
    pub made_database: Option<String>,
    pub http: reqwest::Client,
}

pub struct Own<'a> {
    pub bin_dir: &'a Path,
    pub dir: &'a Path,
    pub admin_url: &'a str,
    pub run_id: &'a str,
    pub pg_budget: PgBudget,
}

/// Postgres connections per binary (the stack must fit `max_connections` with the checker).
#[derive(Clone, Copy)]
pub struct PgBudget {
    pub order_api: u32,
    pub prelock: u32,
    pub per_worker: u32,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `postgres://user@host:port/db` with the database part replaced.
fn with_database(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && i > url.find("://").unwrap_or(0) + 2 => {
            let query = url[i..].find('?').map(|q| &url[i + q..]).unwrap_or("");
            format!("{}/{db}{query}", &url[..i])
        }
        _ => format!("{url}/{db}"),
    }
}

fn with_user(url: &str, user: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_owned(),
    }
}

impl Stack {
    /// Starts a stack of its own: a fresh database `scenario_<run id>` (migrated by
    /// `db-migrate` as `bar_migrator`; the services connect as `bar_app`), a Redis and a
    /// Kafka broker (tansu, in memory) on free ports, and the binaries from `bin_dir`.
    pub async fn start(o: Own<'_>) -> anyhow::Result<Stack> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        for bin in BINARIES {
            let p = o.bin_dir.join(bin);
            if !p.exists() {
                bail!(
                    "{} is missing: build the binaries first (cargo build --release --bins)",
                    p.display()
                );
            }
        }
        std::fs::create_dir_all(o.dir.join("logs"))?;
        let db = format!("scenario_{}", o.run_id);
        let admin = sqlx::PgPool::connect(o.admin_url)
            .await
            .with_context(|| "connect to Postgres as an administrator (--admin-database-url)")?;
        sqlx::query(&format!("CREATE DATABASE {db} OWNER bar_migrator"))
            .execute(&admin)
            .await
            .context("create the scenario's database (roles bar_migrator and bar_app come from scripts/services.sh)")?;
        admin.close().await;
        let migrator = with_user(&with_database(o.admin_url, &db), "bar_migrator");
        let database_url = with_user(&with_database(o.admin_url, &db), "bar_app");
        let admin_database_url = with_database(o.admin_url, &db);
        let status = Command::new(o.bin_dir.join("db-migrate"))
            .env("MIGRATION_DATABASE_URL", &migrator)
            .env("APP_DB_ROLE", "bar_app")
            .stdout(File::create(o.dir.join("logs/db-migrate.log"))?)
            .stderr(File::create(o.dir.join("logs/db-migrate.err.log"))?)
            .status()
            .context("run db-migrate")?;
        if !status.success() {
            bail!(
                "db-migrate failed; see {}",
                o.dir.join("logs/db-migrate.err.log").display()
            );
        }

        let (redis_port, kafka_port) = (free_port()?, free_port()?);
        let redis_url = format!("redis://127.0.0.1:{redis_port}");
        let kafka_brokers = format!("127.0.0.1:{kafka_port}");
        let base_env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| matches!(k.as_str(), "PATH" | "HOME" | "LANG" | "TZ"))
            .collect();
        let log = |name: &str| o.dir.join("logs").join(format!("{name}.log"));
        let mut members = Vec::new();
        let infra = |name: &str, argv: Vec<String>, port| Member {
            name: name.to_owned(),
            argv,
            env: base_env.clone(),
            url: None,
            port: Some(port),
            pid: None,
            pid_file: Some(o.dir.join("pids").join(format!("{name}.pid"))),
            log: log(name),
            child: None,
        };
        members.push(infra(
            "redis",
            [
                "redis-server",
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
            ]
            .into_iter()
            .chain(["--save", "", "--appendonly", "no"])
            .map(str::to_owned)
            .collect(),
            redis_port,
        ));
        let listener = format!("tcp://127.0.0.1:{kafka_port}");
        members.push(infra(
            "kafka",
            [
                "tansu",
                "broker",
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &listener,
                "--storage-engine",
                "memory://tansu/",
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
            kafka_port,
        ));

        let port = |_: ()| free_port();
        let (pp, gp, op) = (port(())?, port(())?, port(())?);
        let url = |p: u16| format!("http://127.0.0.1:{p}");
        let common: Vec<(String, String)> = [
            ("DATABASE_URL", database_url.clone()),
            ("RUN_MIGRATIONS", "false".to_owned()),
            ("REDIS_URL", redis_url.clone()),
            ("KAFKA_BROKERS", kafka_brokers.clone()),
            ("AUTH_JWT_SECRET", DEV_JWT_SECRET.to_owned()),
            ("STAFF_JWT_SECRET", DEV_STAFF_JWT_SECRET.to_owned()),
            // its own local stack, on the development secrets (never reachable from outside)
            ("ALLOW_DEV_SECRETS", "true".to_owned()),
            ("PRELOCK_URL", url(pp)),
            ("GATEWAY_URL", url(gp)),
            ("PUBLIC_URL", url(op)),
            ("GATEWAY_PUBLIC_URL", url(gp)),
            // every buyer of the scenario comes from this one loopback address: the
            // per-address budgets and connection cap would throttle the whole sale, so they
            // are off here; the per-buyer limit stays
            ("RATE_LIMIT_ADDRESS_PER_SEC", "0".to_owned()),
            ("RATE_LIMIT_WEBHOOK_PER_SEC", "0".to_owned()),
            ("HTTP_MAX_CONNECTIONS", "16384".to_owned()),
            ("HTTP_MAX_CONNECTIONS_PER_ADDRESS", "16384".to_owned()),
            (
                "RUST_LOG",
                std::env::var("SCENARIO_RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(base_env.iter().cloned())
        .collect();
        let service = |name: &str, binary: &str, addr: (&str, u16), extra: &[(&str, String)]| {
            let mut env = common.clone();
            env.push((addr.0.to_owned(), format!("127.0.0.1:{}", addr.1)));
            env.push(("HOSTNAME".to_owned(), name.to_owned()));
            env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
            Member {
                name: name.to_owned(),
                argv: vec![o.bin_dir.join(binary).display().to_string()],
                env,
                url: Some(url(addr.1)),
                port: None,
                pid: None,
                pid_file: Some(o.dir.join("pids").join(format!("{name}.pid"))),
                log: log(name),
                child: None,
            }
        };
        let b = o.pg_budget;
        let pg = |n: u32| ("PG_MAX_CONNECTIONS", n.to_string());
        members.push(service(
            "prelock-service",
            "prelock-service",
            ("PRELOCK_ADDR", pp),
            &[pg(b.prelock)],
        ));
        members.push(service(
            "payment-gateway-sim",
            "payment-gateway-sim",
            ("GATEWAY_SIM_ADDR", gp),
            &[],
        ));
        members.push(service(
            "order-api",
            "order-api",
            ("ORDER_API_ADDR", op),
            &[pg(b.order_api)],
        ));
        for (binary, var) in [
            ("scheduler", "SCHEDULER_ADDR"),
            ("compensation-worker", "COMPENSATION_ADDR"),
            ("event-relay", "EVENT_RELAY_ADDR"),
        ] {
            for i in 1..=2 {
                members.push(service(
                    &format!("{binary}-{i}"),
                    binary,
                    (var, port(())?),
                    &[pg(b.per_worker)],
                ));
            }
        }
        let mut stack = Stack {
            members,
            order_api: url(op),
            prelock: url(pp),
            gateway: url(gp),
            kafka_brokers,
            topic: "bar.order.events.v1".to_owned(),
            redis_url,
            redis_prefix: String::new(),
            database_url,
            admin_database_url,
            made_database: Some(db),
            http,
        };
        let pids = o.dir.join("pids");
        std::fs::create_dir_all(&pids)?;
        for i in 0..stack.members.len() {
            let m = &mut stack.members[i];
            m.spawn()?;
            m.wait_up(&stack.http, Duration::from_secs(60)).await?;
            stack.write_pid(i)?;
        }
        Ok(stack)
    }

    /// Attaches to the stack `scripts/dev-up.sh` started: its pid files (`.run/pids/`), the
    /// default URLs (or `ORDER_API_URL`, ...), and each process' argv and environment from
    /// `/proc`, so a killed one is started again as dev-up.sh started it.
    pub async fn attach(run_dir: &Path, dir: &Path) -> anyhow::Result<Stack> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
        let mut members = Vec::new();
        let urls = [
            ("prelock-service", "http://127.0.0.1:8081"),
            ("payment-gateway-sim", "http://127.0.0.1:8090"),
            ("order-api", "http://127.0.0.1:8080"),
            ("scheduler", "http://127.0.0.1:8082"),
            ("compensation-worker", "http://127.0.0.1:8083"),
            ("event-relay", "http://127.0.0.1:8084"),
            ("tansu", ""),
        ];
        for (name, url) in urls {
            let pid_file = run_dir.join("pids").join(format!("{name}.pid"));
            let pid: u32 = std::fs::read_to_string(&pid_file)
                .with_context(|| {
                    format!(
                        "{} (is the stack up? scripts/dev-up.sh)",
                        pid_file.display()
                    )
                })?
                .trim()
                .parse()
                .with_context(|| format!("{}", pid_file.display()))?;
            let (argv, penv) =
                proc_command(pid).with_context(|| format!("{name} (pid {pid}) is not running"))?;
            let member_name = match name {
                "tansu" => "kafka".to_owned(),
                n if matches!(n, "scheduler" | "compensation-worker" | "event-relay") => {
                    format!("{n}-1")
                }
                n => n.to_owned(),
            };
            let port = (name == "tansu").then(|| {
                env("KAFKA_BROKERS", "127.0.0.1:9092")
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(9092)
            });
            members.push(Member {
                name: member_name,
                argv,
                env: penv,
                url: (!url.is_empty()).then(|| url.to_owned()),
                port,
                pid: Some(pid),
                pid_file: Some(pid_file),
                log: run_dir.join("logs").join(format!("{name}.log")),
                child: None,
            });
        }
        let redis_url = env("REDIS_URL", "redis://127.0.0.1:6379");
        let redis_port: u16 = redis_url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .unwrap_or(6379);
        let pid = redis_pid(&redis_url).await?;
        // the local Redis runs daemonized (scripts/services.sh): started again the same way
        members.push(Member {
            name: "redis".to_owned(),
            argv: [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "--port",
                &redis_port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
            env: std::env::vars().collect(),
            url: None,
            port: Some(redis_port),
            pid: Some(pid),
            pid_file: None,
            log: dir.join("logs/redis.log"),
            child: None,
        });
        let order_env = &members[2].env;
        let get = |k: &str, d: &str| {
            order_env
                .iter()
                .find(|(n, _)| n == k)
                .map_or(d.to_owned(), |(_, v)| v.clone())
        };
        let database_url = get(
            "DATABASE_URL",
            "postgres://bar_app@127.0.0.1:5432/bar_fulfillment",
        );
        let admin_database_url = with_user(&database_url, "postgres");
        let redis_prefix = get("REDIS_KEY_PREFIX", "");
        Ok(Stack {
            order_api: env("ORDER_API_URL", "http://127.0.0.1:8080"),
            prelock: env("PRELOCK_URL", "http://127.0.0.1:8081"),
            gateway: env("GATEWAY_URL", "http://127.0.0.1:8090"),
            kafka_brokers: env("KAFKA_BROKERS", "127.0.0.1:9092"),
            topic: get("ORDER_EVENTS_TOPIC", "bar.order.events.v1"),
            redis_url,
            redis_prefix,
            database_url,
            admin_database_url,
            made_database: None,
            members,
            http,
        })
    }

    fn write_pid(&self, i: usize) -> anyhow::Result<()> {
        let m = &self.members[i];
        if let (Some(pid), Some(file)) = (m.pid, &m.pid_file) {
            std::fs::write(file, pid.to_string())?;
        }
        Ok(())
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }

    /// Members that exited on their own (not killed by a planned fault), with how they
    /// ended; each is started again, as a supervisor (systemd, Kubernetes) would.
    pub async fn revive_dead(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for i in 0..self.members.len() {
            let m = &mut self.members[i];
            let ended = match (m.child.as_mut(), m.pid) {
                (Some(c), _) => match c.try_wait() {
                    Ok(Some(status)) => Some(status.to_string()),
                    _ => None,
                },
                // not our child (attached): gone from /proc; Redis runs daemonized and is
                // looked after by the Redis fault alone
                (None, Some(pid)) if m.name != "redis" => {
                    (!Path::new(&format!("/proc/{pid}")).exists()).then(|| "exited".to_owned())
                }
                _ => None,
            };
            let Some(how) = ended else { continue };
            m.child = None;
            m.pid = None;
            let restarted = m.restart(&self.http).await;
            let _ = self.write_pid(i);
            out.push((
                self.members[i].name.clone(),
                match restarted {
                    Ok(()) => format!("{how}; started again"),
                    Err(e) => format!("{how}; could not be started again: {e:#}"),
                },
            ));
        }
        out
    }

    /// `SIGKILL` member `i`, wait `down`, start it again and wait until it is up.
    pub async fn crash_and_restart(&mut self, i: usize, down: Duration) -> anyhow::Result<()> {
        if self.members[i].name == "redis" {
            // Redis daemonized by the scripts is not our child: its pid comes from INFO
            if self.made_database.is_none() {
                self.members[i].pid = Some(redis_pid(&self.redis_url).await?);
            }
        }
        let m = &mut self.members[i];
        tokio::task::block_in_place(|| m.kill());
        tokio::time::sleep(down).await;
        m.restart(&self.http).await?;
        if self.made_database.is_none() && m.name == "redis" {
            // daemonized: the pid we started exited; the server's is in INFO
            m.pid = Some(redis_pid(&self.redis_url).await?);
        }
        self.write_pid(i)?;
        Ok(())
    }

    /// Terminates every connection the services hold to the database
    /// (`pg_terminate_backend`); returns how many.
    pub async fn terminate_connections(&self, admin: &sqlx::PgPool) -> anyhow::Result<i64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()
                AND usename <> current_user) t",
        )
        .fetch_one(admin)
        .await?;
        Ok(n)
    }

    /// Stops what this run started and drops its database (a stack it attached to is left
    /// as it was).
    pub async fn stop(&mut self, admin_url: &str) {
        if self.made_database.is_none() {
            return;
        }
        for m in self.members.iter_mut().rev() {
            if let (Some(c), Some(pid)) = (m.child.as_mut(), m.pid) {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(10) {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            m.kill();
        }
        if let Some(db) = &self.made_database {
            if let Ok(admin) = sqlx::PgPool::connect(admin_url).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                    .execute(&admin)
                    .await;
            }
        }
    }

    /// How to stop a stack left running (`--keep`).
    pub fn stop_hint(&self, admin_url: &str) -> String {
        let pids: Vec<String> = self
            .members
            .iter()
            .filter_map(|m| m.pid.map(|p| p.to_string()))
            .collect();
        match &self.made_database {
            Some(db) => format!(
                "kill {} && psql '{admin_url}' -c 'DROP DATABASE {db} WITH (FORCE)'",
                pids.join(" ")
            ),
            None => "scripts/dev-down.sh".to_owned(),
        }
    }
}

/// The binaries a stack of its own runs.
pub const BINARIES: &[&str] = &[
    "db-migrate",
    "prelock-service",
    "payment-gateway-sim",
    "order-api",
    "scheduler",
    "compensation-worker",
    "event-relay",
];

/// A running process' argv and environment.
fn proc_command(pid: u32) -> anyhow::Result<(Vec<String>, Vec<(String, String)>)> {
    let split = |bytes: Vec<u8>| -> Vec<String> {
        bytes
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    let mut argv = split(std::fs::read(format!("/proc/{pid}/cmdline"))?);
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
        if let Some(first) = argv.first_mut() {
            if !first.starts_with('/') && !first.contains('/') {
                // a bare name (tansu, redis-server) is found on PATH again
            } else {
                *first = exe.display().to_string();
            }
        }
    }
    let env = split(std::fs::read(format!("/proc/{pid}/environ"))?)
        .into_iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    if argv.is_empty() {
        bail!("no command line");
    }
    Ok((argv, env))
}

async fn redis_pid(url: &str) -> anyhow::Result<u32> {
    let client = redis::Client::open(url)?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .context("redis: connect timed out")??;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .context("redis INFO has no process_id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_are_rewritten_in_place() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database(
                "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
                "x"
            ),
            "postgres://postgres@127.0.0.1:5432/x?sslmode=disable"
        );
        assert_eq!(
            with_user("postgres://postgres@127.0.0.1:5432/x", "bar_app"),
            "postgres://bar_app@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_user("postgres://127.0.0.1:5432/x", "bar_app"),
            "postgres://bar_app@127.0.0.1:5432/x"
        );
    }
}
