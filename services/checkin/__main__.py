from services.checkin.server import SPEC
from services.core.server import main

main(SPEC)
