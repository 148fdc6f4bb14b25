//! The `llmtool` binary: parse the command line, run the command, map errors to exit codes.

use clap::Parser;
use llmtool::cli::{Cli, Command};
use llmtool::commands;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
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
        Command::Bench(args) => commands::bench::run(args),
    };
    if let Err(e) = result {
        for line in format!("{e:#}").lines() {
            eprintln!("error: {line}");
        }
        std::process::exit(llmtool::exit_code(&e));
    }
}
