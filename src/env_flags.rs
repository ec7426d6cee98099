//! Every `spark serve` flag also from the environment: `--cache-slots` from `SPARK_CACHE_SLOTS`,
//! `--quiet` from `SPARK_QUIET=1`, and so on (`SPARK_` + the long name in capitals, `-` as `_`),
//! as llama-server takes its flags from `LLAMA_ARG_*`. A flag on the command line wins over its
//! variable; `--help` shows each variable beside its flag.
//!
//! Owns only the naming rule, applied to the CLI definition when the binary builds it, so a
//! flag added to `ServeArgs` later gets its variable without anyone writing it down. Switches
//! (flags without a value) read their variable as a boolean: `0`, `false`, `no`, `off` and the
//! empty string are off, anything else on. `SPARK_TAP` and `SPARK_LLAMA_SERVER` keep their older
//! meaning (where to look when the flag is absent, read by the library). A variable counts as
//! its flag given, so variables of flags that exclude each other are refused as the flags would
//! be. Never touches the `LLAMA_ARG_*` variables: they reach llama-server as they were.

/// `spark serve` settings llama-server also takes from its own variables: when neither the flag
/// nor its `SPARK_*` variable is given, llama-server's `LLAMA_ARG_*` one applies (the flag wins,
/// then `SPARK_*`, then `LLAMA_ARG_*`).
pub const LLAMA_FALLBACKS: [(&str, &str); 3] = [
    ("SPARK_MODEL", "LLAMA_ARG_MODEL"),
    ("SPARK_HOST", "LLAMA_ARG_HOST"),
    ("SPARK_PORT", "LLAMA_ARG_PORT"),
];

/// Applies [`LLAMA_FALLBACKS`] to this process's environment before the CLI is parsed. Call it
/// once, first thing in `main`, while the process has one thread.
pub fn apply_llama_fallbacks() {
    for (spark, llama) in LLAMA_FALLBACKS {
        if std::env::var_os(spark).is_none() {
            if let Some(v) = std::env::var_os(llama) {
                std::env::set_var(spark, v);
            }
        }
    }
}

/// The variable of a long flag: `SPARK_` + the name in capitals, `-` as `_`.
pub fn var_name(long: &str) -> String {
    format!("SPARK_{}", long.to_ascii_uppercase().replace('-', "_"))
}

/// Gives every long flag of `cmd` its `SPARK_*` variable, except `--help`, a flag that has a
/// variable already, and a flag whose help names its variable as a fallback the library reads
/// itself (`--tap`: "default: $SPARK_TAP, then next to the spark binary"): that variable keeps
/// its meaning, a place to look when the flag is absent, so `SPARK_TAP` set for every tool does
/// not count as `--tap` given (which `--no-tap` would refuse).
pub fn with_env(mut cmd: clap::Command) -> clap::Command {
    let ids: Vec<(String, String, bool)> = cmd
        .get_arguments()
        .filter(|a| a.get_env().is_none() && !a.is_global_set())
        .filter_map(|a| {
            let long = a.get_long()?;
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            if help.contains(&format!("${}", var_name(long))) {
                return None;
            }
            let switch = matches!(a.get_action(), clap::ArgAction::SetTrue);
            let help = matches!(
                a.get_action(),
                clap::ArgAction::Help | clap::ArgAction::HelpLong | clap::ArgAction::Version
            );
            (!help).then(|| (a.get_id().to_string(), long.to_string(), switch))
        })
        .collect();
    for (id, long, switch) in ids {
        let var = var_name(&long);
        cmd = cmd.mut_arg(id, |a| {
            let a = a.env(var);
            if switch {
                a.value_parser(clap::builder::FalseyValueParser::new())
            } else {
                a
            }
        });
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cmd() -> Command {
        with_env(
            Command::new("serve")
                .arg(Arg::new("cache_slots").long("cache-slots"))
                .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue))
                .arg(Arg::new("tap").long("tap").env("SPARK_TAP_ELSEWHERE")),
        )
    }

    #[test]
    fn names_follow_the_long_flag() {
        assert_eq!(var_name("cache-slots"), "SPARK_CACHE_SLOTS");
        assert_eq!(var_name("llama-server"), "SPARK_LLAMA_SERVER");
        let c = cmd();
        let env = |id: &str| {
            c.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(env("cache_slots").as_deref(), Some("SPARK_CACHE_SLOTS"));
        assert_eq!(env("quiet").as_deref(), Some("SPARK_QUIET"));
        assert_eq!(env("tap").as_deref(), Some("SPARK_TAP_ELSEWHERE"), "kept");
        assert_eq!(
            env("llama_server"),
            None,
            "a fallback the library reads keeps its meaning"
        );
    }
}
