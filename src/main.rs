//! The `llmtool` binary: parse the command line, run the command, map errors to exit codes.

use clap::Parser;
use llmtool::cli::{Cli, Command};
use llmtool::commands;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the mimalloc that libmimalloc-sys bundles (v2 and v3 alike).
const MI_OPTION_PURGE_DELAY: i32 = 15;

/// Keeps freed memory mapped instead of returning it to the OS 10 ms after a free (mimalloc's
/// default): a training step frees and re-allocates the same large buffers every step, and the
/// kernel zeroing the re-faulted pages cost 4–8% of a CPU training step. The peak is unchanged;
/// memory is simply not handed back until the process ends. `MIMALLOC_PURGE_DELAY` in the
/// environment still wins.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called first in `main`, before any other thread exists; -1 means "never".
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Lets a command that prints end quietly when its reader goes away (`llmtool data stats DIR |
/// head`), as Unix tools do: Rust ignores SIGPIPE, and printing to a closed pipe would panic.
/// Training keeps ignoring it, so a closed stdout never ends a run without its checkpoint.
fn quit_on_closed_pipe(command: &Command) {
    #[cfg(unix)]
    if !matches!(command, Command::Train(_) | Command::Finetune(_)) {
        // SAFETY: called in `main` before any other thread exists; SIG_DFL is always valid.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
}

fn main() {
    keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A value out of its range is one line, as every other bad input is.
        Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation => {
            let rendered = e.to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or_default());
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    };
    quit_on_closed_pipe(&cli.command);
    let result = match cli.command {
        Command::Config(c) => commands::config::run(c),
        Command::Eval(a) => commands::eval::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Train(args) => commands::train::run(args),
        Command::Finetune(args) => commands::finetune::run(args),
        Command::Estimate(args) => commands::estimate::run(args),
        Command::Data(c) => commands::data::run(c),
        Command::Tokenizer(c) => commands::tokenizer::run(c),
        Command::Merge(args) => commands::merge::run(&args),
        Command::Export(args) => commands::export::run(&args),
        Command::Bench(args) => commands::bench::run(args),
    };
    if let Err(e) = result {
        for line in llmtool::error_message(&e).lines() {
            eprintln!("error: {line}");
        }
        std::process::exit(llmtool::exit_code(&e));
    }
}
