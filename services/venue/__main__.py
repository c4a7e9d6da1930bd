from services.core.server import main
from services.venue.server import SPEC

main(SPEC)
