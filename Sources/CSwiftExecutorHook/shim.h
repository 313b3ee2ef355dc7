#ifndef FTS_TOKEND_SWIFT_EXECUTOR_HOOK_H
#define FTS_TOKEND_SWIFT_EXECUTOR_HOOK_H

// The Swift runtime's global-executor hook (swift/Runtime/Concurrency.h): a pointer to a Swift
// function taking a job and the default enqueue function, called instead of it when set.
// Declared untyped: Swift stores a function of the right type through the setter below.
//
// Referenced here rather than found with dlsym (as NIO does) because a binary linked with
// --static-swift-stdlib does not export it; the linker still resolves it.
extern void *swift_task_enqueueGlobal_hook;

static inline void fts_set_enqueue_global_hook(const void *hook) {
    swift_task_enqueueGlobal_hook = (void *)hook;
}

#endif
