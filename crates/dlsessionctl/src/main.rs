//! `dlsessionctl`: see the library for everything.

fn main() -> std::process::ExitCode {
    dlsessionctl::main()
}
