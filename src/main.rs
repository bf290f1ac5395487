//! `autoattach`: see `autoattach --help` and README.md.

fn main() -> std::process::ExitCode {
    autoattach::cli::main()
}
