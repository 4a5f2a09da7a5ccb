//! NATS core pub/sub against nats-server, with the async-nats client: the in-memory ceiling for
//! the relay phase (no persistence, no acknowledgement in the protocol). Each user subscribes to
//! `u.<digits>`; the receiver publishes a receipt to the sender's subject, so "delivered" means
//! the same as for the other targets. async-nats connects from 127.0.0.1 (it cannot bind a
//! source address); the relay phase opens at most 2,000 connections, well within one address's
//! ports.

use std::rc::Rc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::sync::mpsc;

use crate::common::{self, StepStats, Tag, Window, KIND_MESSAGE, KIND_RECEIPT};
use crate::worker::{spawn_guarded, Ctx, PairLink, TaskGuard};

fn subject(index: u32) -> String {
    format!("u.{}", common::digits(index))
}

async fn connect(ctx: &Ctx, index: u32) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name(common::digits(index))
        .connection_timeout(Duration::from_secs(20))
        .subscription_capacity(65_536)
        .client_capacity(65_536)
        .connect(ctx.endpoint.addr.to_string())
        .await
        .with_context(|| format!("NATS connect for user {index}"))
}

/// Connects one relay pair (sender `2p`, receiver `2p+1`).
pub async fn relay_pair(
    ctx: &Ctx,
    pair: u32,
    stats: Rc<StepStats>,
    window: Rc<Window>,
) -> anyhow::Result<PairLink> {
    let (sender_index, receiver_index) = (2 * pair, 2 * pair + 1);
    let receiver = connect(ctx, receiver_index).await?;
    let mut receiver_sub = receiver
        .subscribe(subject(receiver_index))
        .await
        .map_err(|e| anyhow!("subscribe: {e}"))?;
    let sender = connect(ctx, sender_index).await?;
    let mut sender_sub = sender
        .subscribe(subject(sender_index))
        .await
        .map_err(|e| anyhow!("subscribe: {e}"))?;
    // Both subscriptions must be known to the server before the first message.
    receiver.flush().await.map_err(|e| anyhow!("flush: {e}"))?;
    sender.flush().await.map_err(|e| anyhow!("flush: {e}"))?;

    let receiver_stats = Rc::clone(&stats);
    let receipt_subject = subject(sender_index);
    let receiver_reader = spawn_guarded(async move {
        while let Some(message) = receiver_sub.next().await {
            if let Some((KIND_MESSAGE, tag)) = common::parse_payload(&message.payload) {
                receiver_stats.on_deliver(tag);
                if let Err(e) = receiver
                    .publish(
                        receipt_subject.clone(),
                        Bytes::from(common::receipt_payload(tag)),
                    )
                    .await
                {
                    receiver_stats.error(format!("receipt publish: {e}"));
                }
            }
        }
    });
    let sender_stats = Rc::clone(&stats);
    let sender_reader = spawn_guarded(async move {
        while let Some(message) = sender_sub.next().await {
            if let Some((KIND_RECEIPT, tag)) = common::parse_payload(&message.payload) {
                if sender_stats.on_receipt(tag) {
                    window.give();
                }
            }
        }
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<Tag>();
    let writer_stats = Rc::clone(&stats);
    let to = subject(receiver_index);
    let writer = spawn_guarded(async move {
        while let Some(tag) = rx.recv().await {
            match sender
                .publish(to.clone(), Bytes::from(common::message_payload(tag)))
                .await
            {
                Ok(()) => {
                    if tag.step == writer_stats.step.get() {
                        writer_stats.sent.set(writer_stats.sent.get() + 1);
                    }
                }
                Err(e) => writer_stats.error(format!("publish: {e}")),
            }
        }
    });
    Ok(PairLink {
        send: Box::new(move |tag| tx.send(tag).is_ok()),
        _guards: TaskGuard::many(vec![receiver_reader, sender_reader, writer]),
    })
}
