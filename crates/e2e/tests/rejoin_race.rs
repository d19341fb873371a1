//! A session the app drops while the library is rejoining its sessions after a reconnect is
//! not attached again behind the app's back. (Its own binary: the pause it sets on rejoins
//! holds for the whole process.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use dlsession::proto::{Request, Response};
use dlsession::{Client, ClientOptions, Session, SessionConfiguration};
use dlsession_testkit::{LONG, Recorder, Seen, TestDaemon, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_dropped_during_its_rejoin_stays_detached() {
    // Every rejoin waits 2 s after the reconnect: the window the app drops its session in.
    dlsession::test_hooks::pause_rejoins(Duration::from_secs(2));
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let config = SessionConfiguration::background("t.dropped").socket(&env.socket);
    let session = Session::attach(config, delegate).await.unwrap();
    // The app keeps its connection (for other work) after it drops the session.
    let _connection = session.client().clone();

    d.kill9();
    events.wait("the app told of the lost connection", LONG, |e| *e == Seen::ConnectionLost).await;
    d.restart();
    events.wait("the app told it is back", LONG, |e| *e == Seen::Reconnected).await;
    // Past the moment the library listed the sessions to rejoin, before their rejoin starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(session);
    // The rejoin's time comes and goes.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let other =
        Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() }).await.unwrap();
    let r = other.request(Request::GetSession { identifier: "t.dropped".into() }).await.unwrap();
    let Response::Session(info) = r else { panic!("{r:?}") };

    assert!(!info.attached, "a session the app dropped was attached again by its rejoin");
}
