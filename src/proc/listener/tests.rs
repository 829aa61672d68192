//! Listener unit tests.

use super::*;
use crate::codec::{CbId, CnMsg};
use crate::proc::*;

/// `lost()` is `Some` only when the figure is exact, in every combination of sources.
#[test]
fn lost_is_exact_only_when_it_is() {
    let base = LossStats {
        overruns: 1,
        ..LossStats::default()
    };
    // No drop counter: gaps miss the tail after an overrun; without an overrun they
    // are exact; with a kernel filter and no overrun nothing was lost.
    let gaps = LossStats {
        seq_lost: Some(5),
        ..base.clone()
    };
    assert_eq!(
        (gaps.lost(), gaps.lost_source()),
        (None, LossSource::Unknown)
    );
    assert_eq!(gaps.lost_at_least(), 5);
    let quiet = LossStats {
        overruns: 0,
        ..gaps.clone()
    };
    assert_eq!(quiet.lost(), Some(5));
    let filtered = LossStats::default();
    assert_eq!(
        (filtered.lost(), filtered.lost_source()),
        (Some(0), LossSource::NoOverrun)
    );
    // The kernel counter with a witness that saw no user-space datagram: exact, the
    // tail included (9 > 5 gaps), in every filter mode.
    let k = LossStats {
        kernel_drops: Some(9),
        foreign_unaccounted: Some(0),
        ..gaps.clone()
    };
    assert_eq!(
        (k.lost(), k.lost_source()),
        (Some(9), LossSource::KernelCounter)
    );
    let kf = LossStats {
        seq_lost: None,
        ..k.clone()
    };
    assert_eq!(kf.lost(), Some(9));
    // User-space datagrams may be in the count: a range until they are settled...
    let unsettled = LossStats {
        foreign_unaccounted: Some(3),
        ..k.clone()
    };
    assert_eq!(unsettled.lost(), None);
    assert_eq!(unsettled.lost_source(), LossSource::Bounded);
    assert_eq!(
        (unsettled.lost_at_least(), unsettled.lost_at_most()),
        (6, Some(9))
    );
    // ...then exact, without them.
    let settled = LossStats {
        foreign_settled: true,
        ..unsettled.clone()
    };
    assert_eq!(settled.lost(), Some(6));
    assert_eq!(settled.lost_at_most(), Some(6));
    // No witness: exact only where the gaps account for the whole counter.
    let blind = LossStats {
        foreign_unaccounted: None,
        ..k.clone()
    };
    assert_eq!((blind.lost(), blind.lost_at_least()), (None, 5));
    let covered = LossStats {
        kernel_drops: Some(5),
        ..blind.clone()
    };
    assert_eq!(covered.lost(), Some(5));
    // The listener's own drops are added.
    let own = LossStats { dropped: 2, ..k };
    assert_eq!(own.lost(), Some(11));
}

fn msg(what: u32, cpu: u32, seq: u32, body: &[u32]) -> CnMsg {
    let mut d = Vec::new();
    d.extend_from_slice(&what.to_ne_bytes());
    d.extend_from_slice(&cpu.to_ne_bytes());
    d.extend_from_slice(&7u64.to_ne_bytes());
    for w in body {
        d.extend_from_slice(&w.to_ne_bytes());
    }
    d.resize(40, 0);
    CnMsg::new(CbId::PROC, d).with_seq(seq, 0)
}

#[test]
fn decoder_checks_sender_gaps_filter_and_acks() {
    let mut dec = ProcDecoder::new(EventSet::NONZERO_EXIT, true);
    // Spoofed: counted, nothing delivered, not part of the sequence.
    assert_eq!(
        dec.decode(77, &msg(1, 0, 500, &[1, 1, 2, 2])),
        Decoded::default()
    );
    assert!(dec.decode(0, &msg(1, 0, 10, &[1, 1, 2, 2])).event.is_none());
    // A zero exit is filtered; a non-zero one after a gap of 2 is delivered after the
    // loss report.
    assert!(dec
        .decode(0, &msg(0x8000_0000, 0, 11, &[5, 5, 0, 17]))
        .event
        .is_none());
    let items: Vec<Received> = dec
        .decode(0, &msg(0x8000_0000, 0, 14, &[6, 6, 0x100, 17]))
        .into_iter()
        .collect();
    assert!(matches!(
        items[..],
        [
            Received::Lost(Loss::Gap { cpu: 0, count: 2 }),
            Received::Event(_)
        ]
    ));
    // ACKs are reported for matching but not delivered to a filtered set.
    let mut ack = msg(0, 1, 3, &[0]);
    ack.ack = 42;
    let d = dec.decode(0, &ack);
    assert_eq!(d.ack, Some((42, 0)));
    assert!(d.event.is_none());
    // Garbage from the kernel is counted as a decode error.
    let mut bad = msg(3, 0, 15, &[]);
    bad.data = bad.data.slice(..8);
    assert_eq!(dec.decode(0, &bad), Decoded::default());
    let s = dec.stats();
    assert_eq!(
        (s.events, s.spoofed, s.filtered, s.decode_errors, s.seq_lost),
        (1, 1, 2, 1, Some(2))
    );
    assert!(dec.last_decode_error().is_some());
    // Without gap tracking, no gap is reported and the count is unknown after an overrun.
    let mut k = ProcDecoder::new(EventSet::ALL, false).with_acks(true);
    k.decode(0, &msg(1, 0, 1, &[1, 1, 2, 2]));
    let d = k.decode(0, &msg(1, 0, 9, &[1, 1, 3, 3]));
    assert!(d.lost.is_none() && d.event.is_some());
    assert!(k.decode(0, &ack).event.is_some(), "ACKs delivered with ALL");
    k.record_overrun();
    assert_eq!(k.stats().lost(), None);
}
