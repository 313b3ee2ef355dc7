#ifndef FTS_TOKEND_CMALLOC_SHIM_H
#define FTS_TOKEND_CMALLOC_SHIM_H

// glibc's <malloc.h>, which Swift's Glibc module leaves out: malloc_trim(3) for the socket server.
#include <malloc.h>

#endif
