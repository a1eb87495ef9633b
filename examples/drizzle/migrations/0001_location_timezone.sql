ALTER TABLE "locations" ADD COLUMN "timezone" text DEFAULT 'UTC' NOT NULL;--> statement-breakpoint
UPDATE "locations" SET "timezone" = 'Europe/Stockholm' WHERE "name" = 'Harbour';--> statement-breakpoint
CREATE INDEX "locations_timezone_idx" ON "locations" USING btree ("timezone");
