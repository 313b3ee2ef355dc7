import CLinux
import Glibc
import NIOCore
import NIOPosix

/// The signals the daemon acts on (TERM, INT, HUP, USR1), read from a signalfd(2) on the event loop.
///
/// A signalfd reports only blocked signals, and a process-directed signal goes to any thread that
/// does not block it (there: its default action, which ends the process). Threads inherit the mask
/// of the thread that starts them, so `blockInEveryThread()` must run first thing in `main`, before
/// any thread exists; children must unblock them again (`RotateActionRunner.spawn` does). A signal
/// that arrives before `open` waits, blocked, and is read then.
///
/// Not a DispatchSource: the daemon keeps libdispatch idle (README "Threads and idle cost").
public enum DaemonSignals {
    /// Each handled signal and what it asks of the daemon (README "Signals").
    static let meanings: [(number: Int32, signal: DaemonCore.Signal)] = [
        (SIGTERM, .terminate(name: "TERM")), (SIGINT, .terminate(name: "INT")), (SIGHUP, .reload), (SIGUSR1, .refresh),
    ]
    static let handled = meanings.map(\.number)

    /// What a handled signal asks of the daemon; nil for any other.
    static func meaning(of number: Int32) -> DaemonCore.Signal? {
        meanings.first { $0.number == number }?.signal
    }

    /// Blocks the handled signals in the calling thread and in every thread it starts from now on.
    public static func blockInEveryThread() {
        var set = handledSet()
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// A channel on `loop` that calls `deliver` with each handled signal received; close it to stop.
    static func open(on loop: any EventLoop, deliver: @escaping @Sendable (Int32) -> Void) async throws -> any Channel {
        var set = handledSet()
        let descriptor = signalfd(-1, &set, Int32(SFD_CLOEXEC | SFD_NONBLOCK))
        guard descriptor >= 0 else { throw SystemError("signalfd", errno: errno) }
        do {
            return try await NIOPipeBootstrap(group: loop)
                // A signalfd read shorter than one record fails (EINVAL): never let NIO's adaptive
                // allocator shrink the read below it.
                .channelOption(
                    .recvAllocator,
                    value: FixedSizeRecvByteBufferAllocator(capacity: 16 * SignalReader.recordSize)
                )
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(SignalReader(deliver: deliver))
                    }
                }
                .takingOwnershipOfDescriptor(input: descriptor)
                .get()
        } catch {
            close(descriptor)
            throw error
        }
    }

    private static func handledSet() -> sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        for number in handled { sigaddset(&set, number) }
        return set
    }
}

/// Turns signalfd reads (whole `signalfd_siginfo` records, never parts) into signal numbers.
private final class SignalReader: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    static let recordSize = MemoryLayout<signalfd_siginfo>.size

    private let deliver: @Sendable (Int32) -> Void

    init(deliver: @escaping @Sendable (Int32) -> Void) {
        self.deliver = deliver
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let records = unwrapInboundIn(data)
        var offset = records.readerIndex
        while offset + Self.recordSize <= records.writerIndex {
            // ssi_signo is the record's first field.
            if let number = records.getInteger(at: offset, endianness: .host, as: UInt32.self) {
                deliver(Int32(number))
            }
            offset += Self.recordSize
        }
    }
}
