//! A session the app drops while the library is rejoining its sessions after a reconnect is
//! not attached again behind the app's back. (Its own binary: the pause it sets on rejoins
//! holds for the whole process.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use dlsession::proto::{Request, Response};
use dlsession::{Client, ClientOptions, Session, SessionConfiguration};
use dlsession_testkit::{LONG, Recorder, Seen, TestDaemon, TestEnv};

/// Whether session `identifier` is attached after its app let it go (dropped, or detached
/// with `detach()`) while the library was rejoining it.
async fn attached_after_letting_go_during_the_rejoin(identifier: &str, detach: bool) -> bool {
    // Every rejoin waits 2 s after the reconnect: the window the app lets the session go in.
    dlsession::test_hooks::pause_rejoins(Duration::from_secs(2));
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let config = SessionConfiguration::background(identifier).socket(&env.socket);
    let session = Session::attach(config, delegate).await.unwrap();
    // The app keeps its connection (for other work) after it lets the session go.
    let _connection = session.client().clone();

    d.kill9();
    events.wait("the app told of the lost connection", LONG, |e| *e == Seen::ConnectionLost).await;
    d.restart();
    events.wait("the app told it is back", LONG, |e| *e == Seen::Reconnected).await;
    // Past the moment the library listed the sessions to rejoin, before their rejoin starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if detach {
        // The detach stays on its way (the daemon stopped) while the rejoin's time comes.
        dlsession_testkit::host::signal(d.pid(), rustix::process::Signal::STOP);
        let detaching = tokio::spawn({
            let session = session.clone();
            async move { session.detach().await }
        });
        tokio::time::sleep(Duration::from_millis(2200)).await;
        dlsession_testkit::host::signal(d.pid(), rustix::process::Signal::CONT);
        detaching.await.unwrap().unwrap();
    }
    drop(session);
    // The rejoin's time comes and goes.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let other =
        Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() }).await.unwrap();
    let r = other.request(Request::GetSession { identifier: identifier.into() }).await.unwrap();
    let Response::Session(info) = r else { panic!("{r:?}") };
    info.attached
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_dropped_during_its_rejoin_stays_detached() {
    let attached = attached_after_letting_go_during_the_rejoin("t.dropped", false).await;
    assert!(!attached, "a session the app dropped was attached again by its rejoin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_detached_during_its_rejoin_stays_detached() {
    let attached = attached_after_letting_go_during_the_rejoin("t.detached", true).await;
    assert!(!attached, "a session the app detached was attached again by its rejoin");
}

/// A session invalidated and removed while the app was away (another client acknowledged
/// its last event) is over for the app: its rejoin tells it so instead of making a new,
/// empty session under the old identifier behind its back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_removed_while_away_is_not_made_again_by_the_rejoin() {
    use dlsession::proto::{Event, ServerMessage};
    dlsession::test_hooks::pause_rejoins(Duration::from_secs(2));
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let config = SessionConfiguration::background("t.removed").socket(&env.socket);
    let _session = Session::attach(config, delegate).await.unwrap();
    d.kill9();
    events.wait("the app told of the lost connection", LONG, |e| *e == Seen::ConnectionLost).await;
    d.restart();
    events.wait("the app told it is back", LONG, |e| *e == Seen::Reconnected).await;
    // Meanwhile another client ends the session: invalidated, its last event acknowledged.
    let mut other = dlsession_testkit::raw::RawClient::connect(&env.socket);
    other.send([(1, Request::FinishTasksAndInvalidate { identifier: "t.removed".into() })]);
    let attach = Request::Attach { identifier: "t.removed".into(), config: Default::default(), takeover: false };
    other.send([(2, attach)]);
    let seq = loop {
        if let ServerMessage::Event(Event::Durable { seq, .. }) = other.recv() {
            break seq;
        }
    };
    other.send([(3, Request::AckEvents { identifier: "t.removed".into(), seqs: vec![seq] })]);
    loop {
        if let ServerMessage::Event(Event::Detached { .. }) = other.recv() {
            break;
        }
    }
    events
        .wait("the app told the session is over", LONG, |e| *e == Seen::Detached(dlsession::DetachReason::Invalidated))
        .await;
    let client =
        Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() }).await.unwrap();
    let r = client.request(Request::GetSession { identifier: "t.removed".into() }).await;
    assert!(r.is_err(), "the rejoin made the session again: {r:?}");
}
