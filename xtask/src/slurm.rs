//! Slurm, as sweeps and searches use it: the `[slurm]` options of a sweep or search file (and
//! the flags that override them), the `#SBATCH` lines they become, array specifications
//! (`0-3,7%2`), and what `scontrol -o show job` says about an array's tasks.
//!
//! Nothing here runs Slurm; the `xtask` binary does (`sbatch`, `scontrol`, `scancel`). Only
//! `scontrol` and the files the tasks write are read back, never `sacct`: a small cluster
//! without `slurmdbd` has no accounting.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How trials are submitted: the `[slurm]` table of a sweep or search file, each key
/// overridable by the flag of the same name (`--partition`, `--time`, …).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSettings {
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Time limit per task, in Slurm's forms: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`,
    /// `D-HH:MM:SS`.
    pub time: Option<String>,
    /// CPUs per task; also the trial's thread count (unless the sweep sets `threads` itself).
    pub cpus_per_task: Option<usize>,
    /// Memory per task: a number with an optional unit `K`, `M`, `G` or `T` (Slurm's `--mem`).
    pub mem: Option<String>,
    /// At most this many tasks of the array at once (`--array=…%K`).
    pub parallel: Option<usize>,
    /// More `#SBATCH` options, each one option as `sbatch` takes it (`"--qos=short"`).
    #[serde(default)]
    pub sbatch: Vec<String>,
}

impl SlurmSettings {
    /// `self` with every option `flags` gives replacing this one's (`sbatch` lines add up).
    pub fn overridden_by(&self, flags: &SlurmSettings) -> SlurmSettings {
        let mut sbatch = self.sbatch.clone();
        sbatch.extend(flags.sbatch.iter().cloned());
        SlurmSettings {
            partition: flags.partition.clone().or_else(|| self.partition.clone()),
            account: flags.account.clone().or_else(|| self.account.clone()),
            time: flags.time.clone().or_else(|| self.time.clone()),
            cpus_per_task: flags.cpus_per_task.or(self.cpus_per_task),
            mem: flags.mem.clone().or_else(|| self.mem.clone()),
            parallel: flags.parallel.or(self.parallel),
            sbatch,
        }
    }

    /// Checks every option's form; the error names the key.
    ///
    /// # Errors
    /// A time limit or memory Slurm would refuse, zero CPUs or parallelism, a name with
    /// spaces, or an `sbatch` line that is not one `-`/`--` option on one line.
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in [("partition", &self.partition), ("account", &self.account)] {
            if let Some(v) = value
                && (v.is_empty() || v.chars().any(char::is_whitespace))
            {
                return Err(format!("key `slurm.{key}`: `{v}` is not a {key} name (no spaces)"));
            }
        }
        if let Some(t) = &self.time
            && !valid_time(t)
        {
            return Err(format!(
                "key `slurm.time`: `{t}` is not a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"
            ));
        }
        if self.cpus_per_task == Some(0) {
            return Err("key `slurm.cpus_per_task`: 0; give at least 1".into());
        }
        if self.parallel == Some(0) {
            return Err("key `slurm.parallel`: 0 tasks at once; give at least 1".into());
        }
        if let Some(m) = &self.mem
            && !valid_mem(m)
        {
            return Err(format!("key `slurm.mem`: `{m}` is not a memory size (e.g. 4G, 500M, 2048)"));
        }
        for (i, line) in self.sbatch.iter().enumerate() {
            if !line.starts_with('-') || line.contains('\n') || line.contains('\r') {
                return Err(format!(
                    "key `slurm.sbatch[{i}]`: `{line}` is not one sbatch option (e.g. \"--qos=short\")"
                ));
            }
        }
        Ok(())
    }

    /// The `#SBATCH` lines of these options (without job name, output or array).
    pub fn header_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut add = |opt: &str, v: Option<String>| {
            if let Some(v) = v {
                lines.push(format!("#SBATCH --{opt}={v}"));
            }
        };
        add("partition", self.partition.clone());
        add("account", self.account.clone());
        add("time", self.time.clone());
        add("cpus-per-task", self.cpus_per_task.map(|c| c.to_string()));
        add("mem", self.mem.clone());
        lines.extend(self.sbatch.iter().map(|l| format!("#SBATCH {l}")));
        lines
    }
}

fn valid_time(t: &str) -> bool {
    let num = |s: &str| !s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit());
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, t),
    };
    if days.is_some_and(|d| !num(d)) {
        return false;
    }
    let parts: Vec<&str> = rest.split(':').collect();
    if !parts.iter().all(|p| num(p)) {
        return false;
    }
    (1..=3).contains(&parts.len())
}

fn valid_mem(m: &str) -> bool {
    let digits = m.strip_suffix(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']).unwrap_or(m);
    !digits.is_empty() && digits.len() <= 12 && digits.bytes().all(|b| b.is_ascii_digit()) && digits != "0"
}

/// `--array` of these task indices: ascending ranges (`0-3,7,9-10`), then `%K` when at most
/// `parallel` may run at once.
pub fn array_spec(indices: &[usize], parallel: Option<usize>) -> String {
    let mut sorted = indices.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { sorted[i].to_string() } else { format!("{}-{}", sorted[i], sorted[j]) });
        i = j + 1;
    }
    let mut spec = parts.join(",");
    if let Some(k) = parallel {
        spec += &format!("%{k}");
    }
    spec
}

/// The task indices of an array specification (`0-3,7%2` → 0, 1, 2, 3, 7); `None` when it is
/// not one.
pub fn parse_array_spec(spec: &str) -> Option<Vec<usize>> {
    let spec = spec.split('%').next()?;
    let mut out = Vec::new();
    for part in spec.split(',') {
        // A stride (`0-9:3`), as Slurm may show it.
        let (range, step) = match part.split_once(':') {
            Some((r, s)) => (r, s.parse::<usize>().ok().filter(|s| *s > 0)?),
            None => (part, 1),
        };
        match range.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
                if b < a || b - a > 1_000_000 {
                    return None;
                }
                out.extend((a..=b).step_by(step));
            }
            None => out.push(range.parse().ok()?),
        }
    }
    Some(out)
}

/// The job id `sbatch --parsable` printed (`1234` or `1234;cluster`).
pub fn parse_job_id(stdout: &str) -> Option<u64> {
    stdout.trim().split(';').next()?.trim().parse().ok()
}

/// A Slurm job state, as `scontrol` names it (`PENDING`, `RUNNING`, `COMPLETED`, `CANCELLED`,
/// `TIMEOUT`, `NODE_FAIL`, `PREEMPTED`, `OUT_OF_MEMORY`, …).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState(pub String);

impl JobState {
    /// Not finished: pending, configuring, running, completing, suspended, requeued, …
    pub fn is_active(&self) -> bool {
        matches!(
            self.0.as_str(),
            "PENDING"
                | "CONFIGURING"
                | "RUNNING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "REQUEUE_HOLD"
                | "REQUEUE_FED"
                | "RESIZING"
                | "SIGNALING"
                | "STAGE_OUT"
                | "STOPPED"
                | "RESV_DEL_HOLD"
        )
    }

    pub fn is_pending(&self) -> bool {
        matches!(self.0.as_str(), "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD")
    }
}

/// One record of `scontrol -o show job`: a job, an array task, or an array's tasks not yet
/// started (one record for all of them).
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub job_id: u64,
    /// The array's id, for a task of an array.
    pub array_job_id: Option<u64>,
    /// The task indices this record stands for (several while they are pending together).
    pub tasks: Vec<usize>,
    pub state: JobState,
    /// Why it waits (`Dependency`, `DependencyNeverSatisfied`, `JobArrayTaskLimit`, …).
    pub reason: String,
    pub node: Option<String>,
    pub exit_code: Option<String>,
}

/// The records of `scontrol -o show job <id>` (one line each); lines that are not records
/// are skipped.
pub fn parse_scontrol(text: &str) -> Vec<JobRecord> {
    text.lines()
        .filter_map(|line| {
            let fields: BTreeMap<&str, &str> = line.split_whitespace().filter_map(|kv| kv.split_once('=')).collect();
            let job_id = fields.get("JobId")?.parse().ok()?;
            let array_job_id = fields.get("ArrayJobId").and_then(|v| v.parse().ok());
            let tasks = match fields.get("ArrayTaskId") {
                Some(spec) => parse_array_spec(spec)?,
                None => Vec::new(),
            };
            Some(JobRecord {
                job_id,
                array_job_id,
                tasks,
                state: JobState((*fields.get("JobState")?).to_string()),
                reason: fields.get("Reason").map_or(String::new(), |r| (*r).to_string()),
                node: fields
                    .get("BatchHost")
                    .or(fields.get("NodeList"))
                    .filter(|n| **n != "(null)")
                    .map(|n| (*n).to_string()),
                exit_code: fields.get("ExitCode").map(|c| (*c).to_string()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_specs_round_trip() {
        assert_eq!(array_spec(&[0, 1, 2, 3], Some(2)), "0-3%2");
        assert_eq!(array_spec(&[7, 0, 2, 1, 9, 10], None), "0-2,7,9-10");
        assert_eq!(array_spec(&[5], None), "5");
        assert_eq!(parse_array_spec("0-3%2"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse_array_spec("1,4-5"), Some(vec![1, 4, 5]));
        assert_eq!(parse_array_spec("0-6:3"), Some(vec![0, 3, 6]));
        assert_eq!(parse_array_spec("x"), None);
        assert_eq!(parse_array_spec("3-1"), None);
        for indices in [vec![0usize], vec![0, 2, 4], vec![1, 2, 3, 10, 11, 40]] {
            assert_eq!(parse_array_spec(&array_spec(&indices, Some(3))), Some(indices));
        }
    }

    #[test]
    fn job_ids_from_sbatch() {
        assert_eq!(parse_job_id("1234\n"), Some(1234));
        assert_eq!(parse_job_id("99;cluster\n"), Some(99));
        assert_eq!(parse_job_id("Submitted batch job 5"), None);
    }

    #[test]
    fn scontrol_records() {
        // As Slurm 22.05 prints them: a pending remainder, a running task, a finished one.
        let text = "JobId=7 ArrayJobId=7 ArrayTaskId=2-3%2 ArrayTaskThrottle=2 JobName=shrink JobState=PENDING Reason=JobArrayTaskLimit Dependency=(null) ExitCode=0:0 BatchHost=(null)\n\
                    JobId=9 ArrayJobId=7 ArrayTaskId=1 JobState=RUNNING Reason=None BatchHost=vm ExitCode=0:0\n\
                    JobId=8 ArrayJobId=7 ArrayTaskId=0 JobState=CANCELLED Reason=None BatchHost=vm ExitCode=0:15\n\
                    JobId=6 JobName=prepare JobState=COMPLETED Reason=None BatchHost=vm ExitCode=0:0\n\
                    slurm_load_jobs error: Invalid job id specified\n";
        let r = parse_scontrol(text);
        assert_eq!(r.len(), 4);
        assert_eq!((r[0].tasks.clone(), r[0].state.is_pending(), r[0].node.clone()), (vec![2, 3], true, None));
        assert_eq!((r[1].job_id, r[1].tasks.clone(), r[1].state.is_active()), (9, vec![1], true));
        assert_eq!(
            (r[2].state.0.as_str(), r[2].state.is_active(), r[2].exit_code.as_deref()),
            ("CANCELLED", false, Some("0:15"))
        );
        assert_eq!((r[3].array_job_id, r[3].tasks.is_empty()), (None, true));
    }

    #[test]
    fn settings_are_checked_and_overridden() {
        let file = SlurmSettings {
            partition: Some("cpu".into()),
            time: Some("1-02:00:00".into()),
            sbatch: vec!["--qos=short".into()],
            ..Default::default()
        };
        assert_eq!(file.validate(), Ok(()));
        let flags = SlurmSettings { time: Some("30".into()), cpus_per_task: Some(4), ..Default::default() };
        let merged = file.overridden_by(&flags);
        assert_eq!(
            merged.header_lines(),
            ["#SBATCH --partition=cpu", "#SBATCH --time=30", "#SBATCH --cpus-per-task=4", "#SBATCH --qos=short"]
        );
        for (bad, key) in [
            (SlurmSettings { time: Some("1h".into()), ..Default::default() }, "slurm.time"),
            (SlurmSettings { mem: Some("4GB".into()), ..Default::default() }, "slurm.mem"),
            (SlurmSettings { cpus_per_task: Some(0), ..Default::default() }, "slurm.cpus_per_task"),
            (SlurmSettings { parallel: Some(0), ..Default::default() }, "slurm.parallel"),
            (SlurmSettings { partition: Some("a b".into()), ..Default::default() }, "slurm.partition"),
            (SlurmSettings { sbatch: vec!["qos=x".into()], ..Default::default() }, "slurm.sbatch[0]"),
            (SlurmSettings { sbatch: vec!["--a\n#SBATCH --b".into()], ..Default::default() }, "slurm.sbatch[0]"),
        ] {
            let err = bad.validate().expect_err(key);
            assert!(err.contains(key), "{err}");
        }
        for ok in ["5", "05:00", "02:00:00", "1-0", "1-02:00", "2-00:00:00"] {
            assert!(valid_time(ok), "{ok}");
        }
        for ok in ["4G", "500M", "2048", "1t"] {
            assert!(valid_mem(ok), "{ok}");
        }
    }
}
