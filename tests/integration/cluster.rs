//! Issue 31: several nodes over one PostgreSQL and one NATS. Users reach different nodes; a copy,
//! a receipt, a presence question and a link code cross between them over the bus.

use crate::support::{
    eventually, number, patience, Listener, Server, TempDatabase, User, PATIENCE,
};

/// `count` nodes over a database of their own and NATS subjects of their own.
fn cluster(count: usize) -> (TempDatabase, Vec<Server>) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CLUSTERS: AtomicU32 = AtomicU32::new(0);
    let prefix = format!(
        "it{}x{}",
        std::process::id(),
        CLUSTERS.fetch_add(1, Ordering::Relaxed)
    );
    let database = TempDatabase::create();
    let first = Server::start_node(&database, &prefix, None, &[]);
    let mut nodes = vec![first];
    for _ in 1..count {
        let node = Server::start_node(&database, &prefix, Some(&nodes[0]), &[]);
        nodes.push(node);
    }
    (database, nodes)
}

#[test]
fn users_on_different_nodes_talk_see_each_other_and_link_devices() {
    let (_database, nodes) = cluster(3);
    let alice = User::register(&number(), &nodes[0], &[]);
    let bob = User::register(&number(), &nodes[1], &[]);

    // Bob writes to Alice (stored, read at her node), which makes him her contact.
    let (answer, code) = bob.send(&alice.number, "hello from node 2", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(alice.receive_texts(1, PATIENCE), vec!["hello from node 2"]);

    // Bob listens at node 2; Alice, at node 1, sees him online: the question crossed the bus.
    let bob_listening = Listener::start(&bob);
    assert!(
        eventually(patience(), || alice.lookup(&[&bob.number])[0].1 == "online"),
        "alice never saw bob online across nodes"
    );

    // A message to a device listening on another node is pushed to it at once, and its
    // receipt comes back across the bus.
    let wait = PATIENCE.to_string();
    let (answer, code) = alice.send(&bob.number, "across the bus", &["--wait", &wait]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(answer["outcome"], "accepted", "{answer}");
    assert_eq!(answer["receipt"], "delivered", "{answer}");
    let shown = bob_listening.wait_for(|e| e["type"] == "message");
    assert_eq!(shown["text"], "across the bus", "{shown}");

    // Bob stops: Alice sees him offline once his node said so.
    drop(bob_listening);
    assert!(
        eventually(patience(), || alice.lookup(&[&bob.number])[0].1
            == "offline"),
        "alice still saw bob online after he stopped"
    );

    // A code Alice asks for at node 1 links a device that reaches node 3.
    let alice_too = alice.link_device_via(&nodes[2].url);
    let (answer, code) = bob.send(&alice.number, "to both of you", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(alice.receive_texts(1, PATIENCE), vec!["to both of you"]);
    assert_eq!(alice_too.receive_texts(1, PATIENCE), vec!["to both of you"]);
}
