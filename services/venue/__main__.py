from services.kernel.server import main
from services.venue.server import SPEC

main(SPEC)
