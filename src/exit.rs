//! Exit codes of the `spark` binary: the one list, shown in `--help` and the README.

/// Success.
pub const OK: i32 = 0;
/// A check ran and failed (a validation threshold was missed).
pub const CHECK_FAILED: i32 = 1;
/// Usage or input error: bad flags, a missing, truncated or corrupt file.
pub const USAGE: i32 = 2;
/// The planner refused: the model cannot fit the given budget.
pub const REFUSED: i32 = 3;
/// Interrupted by SIGINT or SIGTERM (128 + 2, the shell's convention); a partial report is kept.
pub const INTERRUPTED: i32 = 130;
/// A deadline passed (server never ready, a stalled request, a whole-run deadline).
pub const TIMEOUT: i32 = 124;
/// Standard output was closed by its reader (`spark … | head -1`): spark stops quietly with the
/// status a shell reports for a filter killed by SIGPIPE (128 + 13), so `set -o pipefail` still
/// sees that the output was cut. spark keeps SIGPIPE ignored (it writes to sockets and pipes
/// of clients and children); the closed stdout is caught where it is written.
pub const BROKEN_PIPE: i32 = 141;

/// The table printed at the end of `spark --help`.
pub const HELP: &str =
    "Exit codes: 0 ok, 1 check failed, 2 usage or input error, 3 plan refused, 124 timeout, 130 interrupted, 141 stdout closed by its reader";
