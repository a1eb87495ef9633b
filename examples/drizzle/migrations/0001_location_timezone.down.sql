DROP INDEX "locations_timezone_idx";--> statement-breakpoint
ALTER TABLE "locations" DROP COLUMN "timezone";
