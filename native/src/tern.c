#include "tern.h"

const char *tern_version(void) { return "0.1.0"; }
const char *tern_last_error(void) { return ""; }
