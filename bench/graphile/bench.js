// graphile-worker at the same workload as job-bench, in its best configuration: a local
// queue and batched completion. Prints the same RESULT lines.
//   node bench.js fire <database-url> [rate] [seconds] [ahead ms] [concurrency]
//   node bench.js burndown <database-url> [jobs] [concurrency]
"use strict";
const { run, runMigrations } = require("graphile-worker");
const { Pool } = require("pg");

const [mode, url, ...nums] = process.argv.slice(2);
const num = (i, d) => (nums[i] === undefined ? d : Number(nums[i]));

function preset(concurrency) {
  return {
    worker: {
      connectionString: url,
      concurrentJobs: concurrency,
      maxPoolSize: concurrency + 2,
      pollInterval: 250,
      localQueue: { size: concurrency * 4 },
      completeJobBatchDelay: 0,
      failJobBatchDelay: 0,
    },
  };
}

async function startWorker(concurrency, onJob) {
  return run({
    noHandleSignals: true,
    preset: preset(concurrency),
    taskList: { noop: async (_payload, helpers) => onJob(helpers.job) },
  });
}

async function openJobs(pool) {
  const r = await pool.query("select count(*)::int as n from graphile_worker._private_jobs");
  return r.rows[0].n;
}

async function fire(pool) {
  const [rate, secs, ahead, concurrency] = [num(0, 1000), num(1, 60), num(2, 2000), num(3, 16)];
  const delays = [];
  const runner = await startWorker(concurrency, (job) => {
    delays.push(Math.max(0, Date.now() - new Date(job.run_at).getTime()));
  });
  // the worker is up and idle when the load arrives
  await new Promise((r) => setTimeout(r, 1000));
  const perTick = Math.max(1, Math.floor(rate / 100));
  const started = Date.now();
  let inserted = 0;
  let next = started;
  while (Date.now() - started < secs * 1000) {
    next += 10;
    const wait = next - Date.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    const runAt = new Date(Date.now() + ahead).toISOString();
    await pool.query(
      "select graphile_worker.add_job('noop', '{}'::json, run_at => $1::timestamptz) from generate_series(1, $2)",
      [runAt, perTick],
    );
    inserted += perTick;
    if (inserted % (rate * 10) === 0) console.error(`fire: ${inserted} inserted, ${delays.length} fired`);
  }
  while ((await openJobs(pool)) > 0) await new Promise((r) => setTimeout(r, 100));
  await runner.stop();
  delays.sort((a, b) => a - b);
  const pct = (p) => delays[Math.min(delays.length - 1, Math.floor(delays.length * p))];
  const onTime = delays.filter((d) => d <= 100).length / delays.length;
  console.log(
    `RESULT fire jobs=${delays.length} p50_ms=${pct(0.5).toFixed(2)} p99_ms=${pct(0.99).toFixed(2)} ` +
      `max_ms=${delays[delays.length - 1].toFixed(2)} on_time_pct=${(onTime * 100).toFixed(3)}`,
  );
}

async function burndown(pool) {
  const [jobs, concurrency] = [num(0, 100000), num(1, 16)];
  await pool.query(
    "select graphile_worker.add_job('noop', '{}'::json) from generate_series(1, $1)",
    [jobs],
  );
  await pool.query("vacuum analyze graphile_worker._private_jobs");
  let done = 0;
  const started = Date.now();
  const runner = await startWorker(concurrency, () => {
    done++;
  });
  // checked every 20 ms (the figure's resolution), progress shown every second
  let shown = Date.now();
  for (;;) {
    const open = await openJobs(pool);
    if (open === 0) break;
    if (Date.now() - shown >= 1000) {
      shown = Date.now();
      console.error(`burndown: ${open} of ${jobs} left after ${((Date.now() - started) / 1000).toFixed(1)} s`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  const elapsed = (Date.now() - started) / 1000;
  await runner.stop();
  console.log(`RESULT burndown jobs=${done} seconds=${elapsed.toFixed(2)} jobs_per_s=${(done / elapsed).toFixed(0)}`);
}

(async () => {
  if (!url || !["fire", "burndown"].includes(mode)) {
    console.error("usage: node bench.js fire|burndown <database-url> [numbers...]");
    process.exit(2);
  }
  await runMigrations({ connectionString: url });
  const pool = new Pool({ connectionString: url, max: 4 });
  await pool.query("delete from graphile_worker._private_jobs");
  await (mode === "fire" ? fire(pool) : burndown(pool));
  await pool.end();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
