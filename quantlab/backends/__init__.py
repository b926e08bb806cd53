"""Optional inference backends. Each one imports its heavy dependency inside its functions, never at import time."""
