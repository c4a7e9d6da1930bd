import gc

from services.checkin.server import SPEC
from services.kernel.server import main

# The hot path makes thousands of short-lived objects per batch. Objects made at
# start-up (modules, descriptors) are frozen out of every collection, and young
# collections run less often, so pauses stay short and rare.
gc.freeze()
gc.set_threshold(20_000, 20, 20)

main(SPEC)
