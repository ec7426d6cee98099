//! Every file spark writes, tried as a hostile or unlucky user would: planted symlinks, writers
//! SIGKILLed mid-write, work directories and logs readable by others, rings left in /dev/shm by
//! a spark killed before the tap greeted, set-aside profiles overwritten.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::telemetry::{named_rings_of, tap_lib};
use crate::util::{self, alive, fixture, spark_bin, tempdir, wait_gone, write_script, Served};

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Temporary files of the atomic writer, old names and new.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp.") || n.contains(".spark-tmp-"))
        .collect()
}

/// Live processes whose command line mentions `needle` (a test's unique temp path).
fn procs_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && alive(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

fn a_profile() -> spark::profile::Profile {
    let mut c = spark::cache::Counts::zero(2, 4);
    c.set(1, 3, 7);
    spark::profile::Profile::new(c, 2, Some("0123456789abcdef".into()))
}

// ---- 2. symlink-followed writes, temporaries of dead writers ----

#[test]
fn a_planted_symlink_cannot_redirect_a_profile_write() {
    let dir = tempdir();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "precious\n").unwrap();
    let profile = dir.path().join("m.gguf.spark.csv");
    // Every name a writer in this process could predict: the old temporary name, and the
    // new prefix with no random part.
    let pid = std::process::id();
    for name in [
        format!(".m.gguf.spark.csv.tmp.{pid}"),
        format!(".m.gguf.spark.csv.spark-tmp-{pid}-"),
    ] {
        std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
    }
    a_profile().write(&profile).unwrap();
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "the symlink's target was overwritten"
    );
    let meta = std::fs::symlink_metadata(&profile).unwrap();
    assert!(
        meta.file_type().is_file(),
        "the profile is not a regular file"
    );
    spark::profile::Profile::read(&profile).unwrap();
    // Profiles stay readable by others, as before (no session text in them).
    assert_eq!(mode_of(&profile) & 0o600, 0o600);
}

/// Writer child of the kill loop: rewrites `$SPARK_TEST_WRITER_DIR/p.csv` (4 MiB) forever.
/// A no-op when the variable is unset (the normal test run).
#[test]
fn atomic_writer_child() {
    let Some(dir) = std::env::var_os("SPARK_TEST_WRITER_DIR") else {
        return;
    };
    let target = PathBuf::from(dir).join("p.csv");
    let body = vec![b'x'; 4 << 20];
    loop {
        spark::atomic_file::write_atomic(&target, &body).unwrap();
    }
}

#[test]
fn a_kill_loop_leaves_no_temporary_files() {
    let dir = tempdir();
    let mut rng = rand::thread_rng();
    let mut seen = 0;
    for _ in 0..20 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["files::atomic_writer_child", "--exact", "--test-threads=1"])
            .env("SPARK_TEST_WRITER_DIR", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Let it start writing, then kill it at a random moment.
        let deadline = Instant::now() + Duration::from_secs(20);
        while temporaries(dir.path()).is_empty() && !dir.path().join("p.csv").exists() {
            assert!(Instant::now() < deadline, "the writer never wrote");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..40_000)));
        child.kill().unwrap();
        child.wait().unwrap();
        seen = seen.max(temporaries(dir.path()).len());
    }
    eprintln!(
        "kill loop: up to {seen} temporaries present between kills: {:?}",
        temporaries(dir.path())
    );
    spark::atomic_file::write_atomic(&dir.path().join("p.csv"), b"last\n").unwrap();
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
    assert_eq!(std::fs::read(dir.path().join("p.csv")).unwrap(), b"last\n");
}

// ---- 3. private work directories, logs and corpora; 4. no ring outlives spark ----

/// A fake llama-server that writes what the tap would find (its ring descriptor and what it
/// is) to `info`, then sleeps (it never becomes ready).
fn fake_server(dir: &Path, info: &Path) -> PathBuf {
    write_script(
        dir,
        "fake-llama-server",
        &format!(
            "#!/bin/sh\n\
             out={info}\n\
             {{ echo \"pid=$$\"; echo \"fd=$SPARK_RING_FD\"; \
             readlink /proc/$$/fd/$SPARK_RING_FD; }} > \"$out.tmp\"\n\
             mv \"$out.tmp\" \"$out\"\n\
             exec sleep 600\n",
            info = info.display()
        ),
    )
}

/// `spark serve` of a fixture with the fake llama-server, with TMPDIR = `tmp`; returns once the
/// fake has started (spark is then waiting for it to become ready, before any greeting).
fn serve_with_fake(dir: &Path, tmp: &Path) -> (Child, String) {
    let model = fixture(dir, "m.gguf", &[]);
    let info = dir.join("fake.info");
    let fake = fake_server(dir, &info);
    std::fs::create_dir_all(tmp).unwrap();
    let mut child = Command::new(spark_bin())
        .args([
            "serve",
            "-m",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--quiet",
            "--ready-timeout",
            "60",
            "--llama-server",
            fake.to_str().unwrap(),
            "--tap",
            tap_lib().to_str().unwrap(),
        ])
        .env("TMPDIR", tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !info.exists() {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("spark serve exited with {s} before starting llama-server");
        }
        assert!(Instant::now() < deadline, "the fake llama-server never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, std::fs::read_to_string(&info).unwrap())
}

fn only_entry(dir: &Path, prefix: &str) -> PathBuf {
    let v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    assert_eq!(v.len(), 1, "one {prefix}* in {}: {v:?}", dir.display());
    v[0].clone()
}

/// The running `child`'s one work dir under `tmp` (named `prefix…`) is 0700 and its
/// llama-server log 0600 (read while it runs; it is killed and reaped before the assertion).
fn work_dir_is_private(tmp: &Path, prefix: &str, mut child: std::process::Child) {
    let work = only_entry(tmp, prefix);
    let modes = (mode_of(&work), mode_of(&work.join("llama-server.log")));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        modes,
        (0o700, 0o600),
        "work dir {:o}, log {:o}",
        modes.0,
        modes.1
    );
}

#[test]
fn serve_work_dir_is_0700_and_its_log_0600() {
    let dir = tempdir();
    let tmp = dir.path().join("tmp");
    let (child, _) = serve_with_fake(dir.path(), &tmp);
    work_dir_is_private(&tmp, "spark-serve-", child);
}

#[test]
fn sigkill_before_the_greeting_leaves_no_ring_and_no_orphan() {
    let dir = tempdir();
    let (mut child, info) = serve_with_fake(dir.path(), &dir.path().join("tmp"));
    let spark_pid = child.id();
    let fake: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let left = named_rings_of(spark_pid);
    let orphan = !wait_gone(fake, Duration::from_secs(5));
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
    assert!(!orphan, "llama-server {fake} outlived a SIGKILLed spark");
    // The child got the ring as an inherited, nameless memory file.
    assert!(
        info.contains("/memfd:spark-ring"),
        "the child's ring descriptor: {info}"
    );
}

#[test]
fn sigkill_during_a_real_tapped_load_leaves_no_ring_and_no_orphan() {
    let dir = tempdir();
    let model = fixture(dir.path(), "tiny.gguf", &[]);
    let needle = dir.path().to_str().unwrap().to_string();
    let mut rng = rand::thread_rng();
    for round in 0..6u64 {
        let mut child = Command::new(spark_bin())
            .args([
                "trace",
                "record",
                "-m",
                model.to_str().unwrap(),
                "--out",
                dir.path().join("t.trace").to_str().unwrap(),
                "--prompt",
                "Hello",
                "--llama-server",
                util::llama_server().to_str().unwrap(),
                "--tap",
                tap_lib().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // From at once to well into llama-server's model load.
        let delay = round * 60 + rng.gen_range(0..60);
        std::thread::sleep(Duration::from_millis(delay));
        let pid = child.id();
        child.kill().unwrap();
        child.wait().unwrap();
        let left = named_rings_of(pid);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !procs_mentioning(&needle).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let orphans = procs_mentioning(&needle);
        assert!(
            left.is_empty(),
            "round {round} (kill after {delay} ms): left in /dev/shm: {left:?}"
        );
        assert!(
            orphans.is_empty(),
            "round {round} (kill after {delay} ms): orphans {orphans:?}"
        );
    }
}

#[test]
fn validate_work_dir_is_0700_and_its_log_0600() {
    let dir = tempdir();
    let model = fixture(dir.path(), "tiny.gguf", &["--router", "skewed"]);
    let corpus = spark::sessions::synth::demo_corpus(&dir.path().join("demo"))
        .unwrap()
        .dir()
        .to_path_buf();
    let profile = dir.path().join("p.spark.csv");
    let f = spark::gguf::GgufFile::open(&model).unwrap();
    let g = spark::gguf::MoeGeometry::of(&f).unwrap();
    let mut c = spark::cache::Counts::zero(g.n_layer as usize, g.n_expert as usize);
    c.set(0, 0, 1);
    spark::profile::Profile::new(c, g.n_expert_used, Some(g.fingerprint.to_string()))
        .write(&profile)
        .unwrap();
    let server = write_script(dir.path(), "fake-server.py", crate::validate::FAKE_SERVER);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let pid_file = dir.path().join("fake.pid");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut child = Command::new(spark_bin())
        .args([
            "validate",
            "-m",
            &s(&model),
            "--profile",
            &s(&profile),
            "--corpus",
            &s(&corpus),
            "--report",
            &s(&dir.path().join("report")),
            "--slots",
            "3",
            "--max-chunks",
            "2",
            "--chunk-tokens",
            "96",
            "--n-gen",
            "6",
            "--llama-server",
            &s(&server),
            "--request-timeout",
            "120",
        ])
        .env("TMPDIR", &tmp)
        .env("FAKE_MODE", "stall")
        .env("FAKE_PID", &pid_file)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let marker = pid_file.with_extension("pid.completion");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(child.try_wait().unwrap().is_none(), "validate ended early");
        assert!(Instant::now() < deadline, "the fake server got no request");
        std::thread::sleep(Duration::from_millis(20));
    }
    work_dir_is_private(&tmp, "spark-validate-", child);
}

#[test]
fn a_corpus_of_session_text_is_owner_only() {
    let dir = tempdir();
    let claude = dir.path().join("claude");
    std::fs::create_dir_all(claude.join("proj")).unwrap();
    std::fs::write(
        claude.join("proj/s.jsonl"),
        concat!(
            r#"{"type":"user","message":{"role":"user","content":"my secret plan"}}"#,
            "\n",
            r#"{"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":"noted"}]}}"#,
            "\n"
        ),
    )
    .unwrap();
    let codex = dir.path().join("codex");
    std::fs::create_dir_all(&codex).unwrap();
    let out = dir.path().join("corpus");
    let o = util::spark(&[
        "sessions",
        "extract",
        "--claude",
        claude.to_str().unwrap(),
        "--codex",
        codex.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut modes = vec![("corpus".to_string(), mode_of(&out))];
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        modes.push((
            e.file_name().to_string_lossy().into_owned(),
            mode_of(&e.path()),
        ));
    }
    assert!(modes.len() >= 3, "manifest and shards: {modes:?}");
    let wrong: Vec<_> = modes
        .iter()
        .filter(|(n, m)| *m != if n == "corpus" { 0o700 } else { 0o600 })
        .map(|(n, m)| format!("{n}={m:o}"))
        .collect();
    assert!(wrong.is_empty(), "not owner-only: {wrong:?}");
}

// ---- 9. set-aside profiles ----

#[test]
fn a_second_stale_profile_does_not_overwrite_the_first() {
    let dir = tempdir();
    let model = fixture(dir.path(), "m.gguf", &[]);
    let profile = spark::profile::path_for(&model);
    let aside = |suffix: &str| {
        let mut s = profile.clone().into_os_string();
        s.push(suffix);
        PathBuf::from(s)
    };
    // Profiles of another model (their fingerprint differs) are set aside; one that cannot be
    // parsed is an error instead (exit 2), so the bodies here are valid profiles.
    let g = spark::gguf::MoeGeometry::of(&spark::gguf::GgufFile::open(&model).unwrap()).unwrap();
    let mut bodies = Vec::new();
    for i in 0..2u64 {
        let mut c = spark::cache::Counts::zero(g.n_layer as usize, g.n_expert as usize);
        c.set(0, 0, 100 + i);
        let other = format!("gguf-1-{i:032x}");
        spark::profile::Profile::new(c, g.n_expert_used, Some(other))
            .write(&profile)
            .unwrap();
        bodies.push(std::fs::read_to_string(&profile).unwrap());
        let served = Served::start(&model, &["--quiet", "--spark"]);
        assert_eq!(served.status()["profile"]["at_start"], "stale");
        drop(served);
        eprintln!("run {i} set the profile aside");
    }
    assert_eq!(
        std::fs::read_to_string(aside(".stale")).unwrap(),
        bodies[0],
        "the first set-aside copy is kept"
    );
    assert_eq!(
        std::fs::read_to_string(aside(".stale.1")).unwrap(),
        bodies[1],
        "the second set-aside copy has its own name"
    );
}

/// SIGTERM in the middle of a command that runs to completion (here `spark fixture --quantize`,
/// whose quantizer hangs): exit 130, its work directory gone, its child gone, no output file.
#[test]
fn a_signal_mid_command_leaves_no_work_directory_and_no_child() {
    let dir = util::tempdir();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let pid_file = dir.path().join("quantize.pid");
    let quantize = util::write_script(
        dir.path(),
        "llama-quantize",
        &format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 60\n",
            pid_file.display()
        ),
    );
    let out = dir.path().join("q.gguf");
    let mut child = Command::new(util::spark_bin())
        .args(["fixture", "--out", out.to_str().unwrap(), "--vocab"])
        .arg(util::default_vocab())
        .args([
            "--quantize",
            "Q8_0",
            "--llama-quantize",
            quantize.to_str().unwrap(),
        ])
        .env("TMPDIR", &tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let quantizer = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the quantizer never started");
        std::thread::sleep(Duration::from_millis(50));
    };
    let work: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert_eq!(work.len(), 1, "one work directory while it runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (status, waited) = {
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                break (s, start.elapsed());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "spark ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err} (after {waited:?})");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "the work directory is removed"
    );
    assert!(
        util::wait_gone(quantizer, Duration::from_secs(10)),
        "the quantizer died with spark"
    );
    assert!(!out.exists(), "no output file");
}
