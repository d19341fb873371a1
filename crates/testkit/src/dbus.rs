//! A private D-Bus standing in for the system bus, with desktop services played by
//! python3-dbusmock (NetworkManager, UPower), each stopped on drop. The daemon under test
//! finds the bus through `DBUS_SYSTEM_BUS_ADDRESS`.
//!
//! Needs `dbus-daemon`, `dbus-send` and Debian's python3-dbusmock (loaded by
//! `/usr/bin/python3`): `apt-get install dbus-daemon dbus-bin python3-dbusmock`.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `dbus-daemon` of its own.
#[derive(Debug)]
pub struct PrivateBus {
    child: Child,
    /// Its address (`unix:path=…`).
    pub address: String,
    services: Vec<Child>,
}

fn need(program: &str, package: &str) {
    assert!(
        Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|o| o.status.success()),
        "{program} is needed for this test: apt-get install {package}"
    );
}

impl PrivateBus {
    /// Starts the bus (its socket under `dir`).
    pub fn start(dir: &std::path::Path) -> PrivateBus {
        need("dbus-daemon", "dbus-daemon");
        need("dbus-send", "dbus-bin");
        let status = Command::new("/usr/bin/python3").args(["-c", "import dbusmock"]).status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "python3-dbusmock is needed for this test (in /usr/bin/python3): apt-get install python3-dbusmock"
        );
        let socket = dir.join("system_bus_socket");
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .arg(format!("--address=unix:path={}", socket.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dbus-daemon");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("dbus-daemon stdout");
        std::io::BufReader::new(stdout).read_line(&mut line).expect("dbus-daemon address");
        let address = line.trim().to_owned();
        assert!(address.starts_with("unix:"), "dbus-daemon printed {address:?}");
        PrivateBus { child, address, services: Vec::new() }
    }

    /// Starts a dbusmock template (`networkmanager`, `upower`, …) on this bus as if it
    /// were the system bus, and waits until it owns `name`.
    pub fn mock(&mut self, template: &str, name: &str) {
        self.spawn_mock("DBUS_SYSTEM_BUS_ADDRESS", &["--template", template], name);
    }

    /// Starts a mock object `name` `path` `iface` on this bus (as a session-bus service),
    /// logging every method call to `log`, and waits until it owns `name`.
    pub fn mock_object(&mut self, name: &str, path: &str, iface: &str, log: &std::path::Path) {
        let log = log.display().to_string();
        self.spawn_mock("DBUS_SESSION_BUS_ADDRESS", &["--session", "-l", &log, name, path, iface], name);
    }

    /// Starts a dbusmock template as a session-bus service on this bus, logging every
    /// method call to `log`, and waits until it owns `name`.
    pub fn mock_session_template(&mut self, template: &str, name: &str, log: &std::path::Path) {
        let log = log.display().to_string();
        self.spawn_mock("DBUS_SESSION_BUS_ADDRESS", &["--session", "-l", &log, "--template", template], name);
    }

    /// A service that owns `name` on this bus and never answers a call (it reads nothing):
    /// a hung system service.
    pub fn hang(&mut self, name: &str) {
        let script = format!(
            "import dbus, time\nbus = dbus.bus.BusConnection({:?})\nbus.request_name({name:?})\ntime.sleep(3600)\n",
            self.address
        );
        let child = Command::new("/usr/bin/python3")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3");
        self.services.push(child);
        self.wait_for_owner(name, "the hung service");
    }

    /// Waits until `name` has an owner on this bus (`who` is to take it).
    fn wait_for_owner(&self, name: &str, who: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.has_owner(name) {
            assert!(Instant::now() < deadline, "{who} did not take {name} on the private bus");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `python3 -m dbusmock ARGS` with this bus as `bus_variable`, until it owns `name`.
    fn spawn_mock(&mut self, bus_variable: &str, args: &[&str], name: &str) {
        let child = Command::new("/usr/bin/python3")
            .args(["-m", "dbusmock"])
            .args(args)
            .env(bus_variable, &self.address)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 -m dbusmock");
        self.services.push(child);
        self.wait_for_owner(name, &format!("dbusmock {args:?}"));
    }

    /// Emits a signal from a mock object; `args` is a dbus-python list expression.
    pub fn emit_signal(&self, dest: &str, path: &str, iface: &str, name: &str, signature: &str, args: &str) {
        let call = format!("m.EmitSignal({iface:?}, {name:?}, {signature:?}, {args})\n");
        self.mock_call(dest, path, &call, &format!("emitting {name}"));
    }

    /// Gives a mock object a method that accepts `in_signature` and returns nothing.
    pub fn add_method(&self, dest: &str, path: &str, iface: &str, method: &str, in_signature: &str) {
        let call = format!("m.AddMethod({iface:?}, {method:?}, {in_signature:?}, '', '')\n");
        self.mock_call(dest, path, &call, &format!("adding {method}"));
    }

    /// Makes a mock service stop answering for `secs` seconds (it sleeps in a method of its
    /// own, called from a process left waiting for the answer): a busy system service,
    /// still on the bus. Returns once the sleep has begun.
    pub fn freeze(&mut self, dest: &str, path: &str, secs: u32) {
        let iface = "org.example.Freeze";
        let call = format!("m.AddMethod({iface:?}, 'Freeze', '', '', 'import time; time.sleep({secs})')\n");
        self.mock_call(dest, path, &call, "adding Freeze");
        // A call that expects no answer is dropped by dbus-python: this one waits for it.
        let caller = Command::new("dbus-send")
            .arg(format!("--bus={}", self.address))
            .args(["--print-reply", &format!("--reply-timeout={}", (secs + 5) * 1000), &format!("--dest={dest}"), path])
            .arg(format!("{iface}.Freeze"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run dbus-send");
        self.services.push(caller);
        // Frozen once a call of ours waits: a Ping that gets no reply in time says so (any
        // other answer, an error included, means it still answers).
        let started = Instant::now();
        let ping =
            ["--print-reply", "--reply-timeout=300", &format!("--dest={dest}"), path, "org.freedesktop.DBus.Peer.Ping"];
        loop {
            let answer = self.send(&ping);
            if answer.contains("org.freedesktop.DBus.Error.NoReply") {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{dest} did not freeze: {answer}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `call` (Python, with `m` the object's `org.freedesktop.DBus.Mock` interface)
    /// against a mock object, through dbus-python; fails the test with `what` if it fails.
    fn mock_call(&self, dest: &str, path: &str, call: &str, what: &str) {
        let script = format!(
            "import dbus\n\
             o = dbus.bus.BusConnection({address:?}).get_object({dest:?}, {path:?})\n\
             m = dbus.Interface(o, 'org.freedesktop.DBus.Mock')\n{call}",
            address = self.address,
        );
        let out = Command::new("/usr/bin/python3").args(["-c", &script]).output().expect("run /usr/bin/python3");
        assert!(out.status.success(), "{what} on {dest}{path}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn has_owner(&self, name: &str) -> bool {
        let out = self.send(&[
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.NameHasOwner",
            &format!("string:{name}"),
        ]);
        out.contains("boolean true")
    }

    /// Sets a property of a mocked object and emits `PropertiesChanged` (dbusmock's
    /// `UpdateProperties`; a property the template lacks is added). `value` is a
    /// dbus-python expression, e.g. `dbus.Boolean(True)`, `dbus.UInt32(1)`.
    pub fn set_property(&self, dest: &str, path: &str, iface: &str, name: &str, value: &str) {
        let call = format!(
            "try:\n    m.UpdateProperties({iface:?}, {{{name:?}: {value}}})\n\
             except dbus.exceptions.DBusException:\n    m.AddProperty({iface:?}, {name:?}, {value})\n"
        );
        self.mock_call(dest, path, &call, &format!("setting {name}"));
    }

    fn send(&self, args: &[&str]) -> String {
        let out = Command::new("dbus-send")
            .arg(format!("--bus={}", self.address))
            .args(args)
            .output()
            .expect("run dbus-send");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        for s in &mut self.services {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
