fn main() -> std::process::ExitCode {
    dlsessiond::main_entry()
}
