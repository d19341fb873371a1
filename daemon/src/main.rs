//! `dlsessiond`: everything is in the library (`dlsessiond::main_entry`), which tests share.

fn main() -> std::process::ExitCode {
    dlsessiond::main_entry()
}
