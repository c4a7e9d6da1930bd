from services.core.server import main
from services.exposure.server import SPEC

main(SPEC)
